# Included right after llama.cpp's project() when `make gguf` builds llama-cpp-python from source
# (CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python's CMakeLists forces LLAMA_BUILD_COMMON=ON in the cache, but its
# Python binding loads only libllama and libggml*: the common library (chat parsers, HTTP client, Jinja engine;
# about 57 of 127 compile steps) is only needed by the multimodal library, which the Makefile turns off
# (LLAVA_BUILD=OFF). A normal variable shadows the cache entry in llama.cpp's directory scope, so llama.cpp
# neither builds nor installs it.
set(LLAMA_BUILD_COMMON OFF)
