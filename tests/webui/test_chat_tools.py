"""The Chat tab's tool turns: a message sent as a tool result is a tool message, and an answer that wrote a
call in the template's tool format carries it as tool_calls (so the next turn renders as training did)."""

from __future__ import annotations

from webui.tabs.chat import TOOL_RESULT, conversation_message

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_chat_history_becomes_a_tool_conversation():
    history = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": CALL},
               {"role": "user", "content": '{"temp": 21}', "metadata": {"title": TOOL_RESULT}}]
    assert [conversation_message(h, tools=True) for h in history] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'}]
    assert conversation_message(history[1], tools=False) == {"role": "assistant", "content": CALL}  # no tools: text
