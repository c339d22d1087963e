"""Side-by-side chat: what the right column needs next to the model loaded on the left, and what it costs.

Decided from files alone (no torch, no weights), so the web UI shows the cost before anything loads and the
worker loads exactly what was shown. The right side is any checkpoint, export or model directory, or
``BASE_OF_LEFT``: the model the left one was tuned from (engine.run.checkpoint.origin_of). Four pairings:

- ``same``: the right side is the left model itself; no second copy.
- ``base``: the left's own base with its adapters switched off while the right side answers; no second copy.
- ``adapter``: other adapters on the left's base, loaded next to the left's as named peft adapters (one base,
  switched per answer); costs the adapter files.
- ``model``: a second model in the worker (a full or freeze checkpoint against its base, two checkpoints on
  different bases); costs its parameter count times the bytes of the load dtype.

``load_right`` (run in the chat worker) loads what ``plan`` decided; importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.run.checkpoint import CheckpointError, origin_of, resolve
from engine.serve.sampling import InferenceError, Target, bytes_per_param, param_count, resolve_target, weights_bytes

BASE_OF_LEFT = "@base"


@dataclass
class Pairing:
    kind: str            # same | base | adapter | model
    right: Target
    bytes: int = 0       # memory the right side adds to the worker
    params: int = 0      # parameters of the second model (kind model)
    per_param: float = 0.0  # bytes per parameter once loaded (kind model)

    @property
    def name(self) -> str:
        """The right side in a few words: its (last) adapter, else its base model directory."""
        path = Path(self.right.adapters[-1] if self.right.adapters else self.right.base)
        return f"{path.parent.name}/{path.name}" if path.name.startswith(("checkpoint-", "final")) else path.name


def right_target(left: Target, choice: str) -> Target:
    """The Target of the right side: ``choice`` is a path, or BASE_OF_LEFT for the model the left was tuned from."""
    choice = (choice or "").strip()
    if not choice:
        raise InferenceError("pick a model for the right side")
    if choice != BASE_OF_LEFT:
        return resolve_target(choice)
    if left.adapters:  # the same base, prompts and tokenizer as the left, with its adapters switched off
        return Target(base=left.base, template=left.template, tokenizer_dir=left.tokenizer_dir)
    try:
        origin = origin_of(resolve(left.base, field=""))
    except CheckpointError as err:
        raise InferenceError(str(err), "not_found") from None
    if origin is None:
        raise InferenceError(f"{left.base} is a base model (no run config or model card names a model it was tuned "
                             "from); pick the model for the right side")
    return resolve_target(str(origin))


def pair(left: Target, right: Target, quantization: str = "none", on_gpu: bool = False) -> Pairing:
    """How the right side is served next to the left one, and the memory it adds."""
    same_base = Path(left.base).resolve() == Path(right.base).resolve()
    if same_base and [str(Path(a).resolve()) for a in left.adapters] == [str(Path(a).resolve()) for a in right.adapters]:
        return Pairing("same", right)
    if same_base and not right.adapters:
        return Pairing("base", right)
    if same_base:
        return Pairing("adapter", right, bytes=sum(weights_bytes(a) for a in right.adapters))
    params, per = param_count(right.base), bytes_per_param(quantization, on_gpu)
    return Pairing("model", right, bytes=int(params * per) + sum(weights_bytes(a) for a in right.adapters),
                   params=params, per_param=per)


def plan(left: Target, choice: str, quantization: str = "none", on_gpu: bool = False) -> Pairing:
    return pair(left, right_target(left, choice), quantization, on_gpu)


def load_right(sides: dict, spec: dict) -> dict:
    """In the chat worker: load ``spec["model"]`` on the right of ``sides["left"]`` as :func:`plan` says (after a
    check that it fits the device's free memory); returns what was loaded, with the worker's memory after it."""
    from engine.serve.inference import ChatModel
    from engine.serve.worker import check_fits, memory_info

    left = sides.get("left")
    if left is None:
        raise InferenceError("load a model on the left first; the right side is compared with it")
    pairing = plan(left.target, spec["model"], left.quantization, left.device.startswith("cuda"))
    if pairing.kind == "same":
        right = left
    else:
        if pairing.bytes:
            check_fits(pairing.bytes, left.device)
        right = ChatModel.from_target(pairing.right, left.quantization, spec.get("template"), device=left.device,
                                      share=left, prefix="r")
    sides["right"] = right
    shared = right is left or right.weights is left.weights
    warnings = right.warnings + ([] if shared or pairing.kind == "model" else [
        f"{pairing.name} has a vocabulary of its own, so it could not share the left's base: it was loaded as a second model"])
    return dict(memory_info(left.device), kind=pairing.kind if shared else "model", name=pairing.name,
                base=right.target.base, adapters=right.target.adapters, template=right.template.name,
                estimate=pairing.bytes, params=pairing.params, per_param=pairing.per_param, shared=shared,
                warnings=warnings)
