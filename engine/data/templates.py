"""Chat templates: conversation -> (prompt ids, response ids) per turn, and back to Jinja.

The registry lives in ``templates.yaml`` next to this file (a table, not code). A
:class:`Template` is one registry entry bound to a tokenizer's bos/eos text; an
:class:`AutoTemplate` wraps the tokenizer's own ``chat_template``. Both offer the same
methods, so the encoder, the chat worker and the export code never ask which one they hold.

Invariant of ``encode_turns``: concatenating every (prompt, response) pair gives the token
sequence of the whole conversation. The prefix and the system prompt (or the default one)
open the first prompt; each response ends with the end-of-turn token(s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from engine.run.config import read_project_yaml

from .tools import call_json, probe_tool_support, uses_tools


TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")
_KEYS = {"prefix", "system", "user", "assistant", "separator", "system_in_user", "stop_words",
         "default_system", "description", "tools", "tool_call", "tool_result", "observation"}
_TOOL_KEYS = ("tools", "tool_call", "tool_result", "observation")
_SLOT = "{{content}}"


class TemplateError(ValueError):
    """A template that does not exist or cannot encode a conversation (a config problem: model.template)."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 field: str | None = "template"):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = f"{file}, line {line}: " if file and line else f"{file}: " if file else ""
        super().__init__(where + message)


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    user: str
    assistant: str
    system: str = _SLOT
    prefix: str = ""
    separator: str = ""
    system_in_user: bool = False
    stop_words: tuple[str, ...] = field(default_factory=tuple)
    default_system: str = ""
    description: str = ""
    tools: str = ""  # the tool schemas' block, appended to the system prompt ({{content}}: one JSON schema a line)
    tool_call: str = ""  # one call, with {{name}} and {{arguments}} (a JSON object); calls are joined by newlines
    tool_result: str = ""  # one tool message
    observation: str = ""  # the tool results after a call (joined), with the assistant header that follows

    @property
    def supports_tools(self) -> bool:
        return bool(self.tool_call)


@lru_cache(maxsize=4)
def load_templates(path: str | Path = TEMPLATES_FILE) -> dict[str, TemplateSpec]:
    """Read and check the template registry."""
    try:
        raw = read_project_yaml(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise TemplateError(f"invalid YAML ({getattr(err, 'problem', err)})", path, mark.line + 1 if mark else None) from None
    specs = {}
    for name, entry in (raw or {}).items():
        if not isinstance(entry, dict):
            raise TemplateError(f"template '{name}' must be a mapping of formats", path)
        unknown = set(entry) - _KEYS
        if unknown:
            raise TemplateError(f"template '{name}' has unknown key(s) {', '.join(sorted(unknown))}", path)
        for key in ("system", "user", "assistant", "tools", "tool_result", "observation"):
            if key in entry and str(entry[key]).count(_SLOT) != 1:
                raise TemplateError(f"template '{name}': {key} must contain {_SLOT} exactly once", path)
        given = [k for k in _TOOL_KEYS if k in entry]
        if given and len(given) != len(_TOOL_KEYS):
            raise TemplateError(f"template '{name}': a tool format needs all of {', '.join(_TOOL_KEYS)}", path)
        if "tool_call" in entry and not all(s in str(entry["tool_call"]) for s in ("{{name}}", "{{arguments}}")):
            raise TemplateError(f"template '{name}': tool_call must contain {{{{name}}}} and {{{{arguments}}}}", path)
        entry = dict(entry, stop_words=tuple(entry.get("stop_words", ())))
        specs[name] = TemplateSpec(name=name, **entry)
    return specs


def template_names() -> list[str]:
    return ["auto", *load_templates()]


def tool_templates() -> list[str]:
    """Registry templates with a tool format."""
    return [name for name, spec in load_templates().items() if spec.supports_tools]


Turn = tuple[list[dict], "dict | None"]


def conversation_turns(messages: list[dict], end: str) -> tuple[str | None, list[Turn]]:
    """(system or None, [(prompt messages, assistant message)]): each assistant message with what precedes it,
    a user message or the tool results of the call before it. The last assistant message is None when
    ``end == "user"`` (a prompt awaiting its answer, after a user message or tool results)."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns, pending, ok, prev = [], [], bool(messages), None
    for m in messages:
        role = m["role"]
        if role == "assistant":
            ok = ok and bool(pending)
            turns.append((pending, m))
            pending, prev = [], "call" if m.get("tool_calls") else "answer"
        else:
            ok = ok and (role == "user" and prev in (None, "answer") or role == "tool" and prev in ("call", "tool"))
            pending.append(m)
            prev = role
    if end == "user":
        ok = ok and bool(pending)
        turns.append((pending, None))
    else:
        ok = ok and not pending
    if not ok:
        raise TemplateError(f"a conversation must be an optional system message, then user/assistant turns (tool "
                            f"results after an assistant message that calls tools) ending with {end}; got roles "
                            f"{', '.join(m['role'] for m in messages) or 'none'}")
    return system, turns


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _stop_ids(tokenizer, words) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for word in words:
        tid = tokenizer.convert_tokens_to_ids(word)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


class Template:
    """A registry template bound to a tokenizer (for its bos/eos token text)."""

    def __init__(self, spec: TemplateSpec, tokenizer, default_system: str | None = None):
        self.spec, self.name = spec, spec.name
        self.default_system = spec.default_system if default_system is None else default_system
        self.stop_words = list(spec.stop_words)
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        self._fmt = {key: getattr(spec, key).replace("{{bos}}", bos).replace("{{eos}}", eos)
                     for key in ("prefix", "system", "user", "assistant", "separator", *_TOOL_KEYS)}

    def _apply(self, key: str, content: str) -> str:
        return self._fmt[key].replace(_SLOT, content, 1)

    def _answer(self, message: dict) -> str:
        """An assistant message's text: its content, then each tool call, joined by newlines."""
        parts = [message["content"]] if message["content"] else []
        for call in message.get("tool_calls") or ():
            name, args = call_json(call)
            parts.append(self._fmt["tool_call"].replace("{{name}}", name).replace("{{arguments}}", args))
        return self._apply("assistant", "\n".join(parts))

    def _system(self, system: str, tools) -> str:
        if not tools:
            return system
        block = self._apply("tools", "\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        return system + block if system else block.lstrip("\n")

    def turn_texts(self, messages: list[dict], end: str = "assistant", tools: list[dict] | None = None
                   ) -> list[tuple[str, str]]:
        """The text of each (prompt, response) pair; the last response is '' when ``end == "user"``. A prompt
        is a user message, or the tool results of the call before it; ``tools`` are the schemas the
        conversation may call (shown after the system prompt)."""
        system, turns = conversation_turns(messages, end)
        if uses_tools(messages, tools) and not self.spec.supports_tools:
            raise TemplateError(f"template '{self.name}' has no tool format, so it cannot show tool schemas, calls or "
                                f"results; use one that has ({', '.join(tool_templates())}), or 'auto' with a model "
                                "whose own chat template supports tools")
        system = self._system(self.default_system if system is None else system, tools)
        pairs = []
        for i, (before, answer) in enumerate(turns):
            prompt = self._fmt["prefix"] if i == 0 else self._fmt["separator"]
            if before[0]["role"] == "tool":
                prompt += self._apply("observation", "".join(self._apply("tool_result", m["content"]) for m in before))
            else:
                user = before[0]["content"]
                if i == 0 and system:
                    if self.spec.system_in_user:
                        user = self._apply("system", system) + user
                    else:
                        prompt += self._apply("system", system)
                prompt += self._apply("user", user)
            pairs.append((prompt, self._answer(answer) if answer is not None else ""))
        return pairs

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The whole text of a conversation that ends with an assistant answer."""
        return "".join(p + r for p, r in self.turn_texts(messages, tools=tools))

    def render_generation_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """Text for inference: the conversation (ending with user or tool results) up to and including the
        assistant header."""
        return "".join(p + r for p, r in self.turn_texts(messages, end="user", tools=tools))

    def encode_turns(self, tokenizer, messages: list[dict], tools: list[dict] | None = None
                     ) -> list[tuple[list[int], list[int]]]:
        return [(_ids(tokenizer, p), _ids(tokenizer, r)) for p, r in self.turn_texts(messages, tools=tools)]

    def stop_token_ids(self, tokenizer) -> list[int]:
        return _stop_ids(tokenizer, self.stop_words)

    def jinja(self) -> str:
        """A Jinja chat template that renders exactly what ``render`` renders (for tokenizer.chat_template).

        The user format already ends with the assistant header, so add_generation_prompt adds nothing.
        """
        q = lambda s: json.dumps(s, ensure_ascii=False)  # a JSON string is a valid Jinja string literal
        pre = {k: self._fmt[k].split(_SLOT) for k in ("system", "user", "assistant")}
        sys_expr = f"{q(pre['system'][0])} + system + {q(pre['system'][1])}"
        user = lambda inner: "{{ " + q(pre["user"][0]) + " + " + inner + " + " + q(pre["user"][1]) + " }}"
        out = ["{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set loop_messages = messages[1:] %}{% else %}{% set system = " + q(self.default_system) + " %}"
               "{% set loop_messages = messages %}{% endif %}"]
        tools = self.spec.supports_tools
        if tools:  # the schemas' block after the system prompt (or alone, its leading newlines dropped)
            t0, t1 = self._fmt["tools"].split(_SLOT)
            out.append("{% set ns = namespace(t='', a='') %}{% if tools %}{% for tool in tools %}{% set ns.t = ns.t + "
                       "('\\n' if not loop.first else '') + (tool | tojson) %}{% endfor %}{% if system %}{% set system = "
                       f"system + {q(t0)} + ns.t + {q(t1)} %}}{{% else %}}{{% set system = {q(t0.lstrip(chr(10)))} + "
                       f"ns.t + {q(t1)} %}}{{% endif %}}{{% endif %}}")
        if self._fmt["prefix"]:
            out.append("{{ " + q(self._fmt["prefix"]) + " }}")
        if not self.spec.system_in_user:
            out.append("{% if system %}{{ " + sys_expr + " }}{% endif %}")
        out.append("{% for message in loop_messages %}{% if message['role'] == 'user' %}")
        if self._fmt["separator"]:
            out.append("{% if not loop.first %}{{ " + q(self._fmt["separator"]) + " }}{% endif %}")
        if self.spec.system_in_user:
            out.append("{% if loop.first and system %}" + user(sys_expr + " + message['content']") + "{% else %}"
                       + user("message['content']") + "{% endif %}")
        else:
            out.append(user("message['content']"))
        if not tools:
            out.append("{% elif message['role'] == 'assistant' %}{{ " + q(pre["assistant"][0]) + " + message['content'] + "
                       + q(pre["assistant"][1]) + " }}{% endif %}{% endfor %}")
            return "".join(out)
        c0, rest = self._fmt["tool_call"].split("{{name}}")
        c1, c2 = rest.split("{{arguments}}")
        o0, o1 = self._fmt["observation"].split(_SLOT)
        r0, r1 = self._fmt["tool_result"].split(_SLOT)
        out.append("{% elif message['role'] == 'assistant' %}{% set ns.a = message['content'] or '' %}"
                   "{% for call in message['tool_calls'] or [] %}{% set fn = call['function'] if call['function'] is "
                   "defined else call %}{% set args = fn['arguments'] if fn['arguments'] is string else "
                   "(fn['arguments'] | tojson) %}{% set ns.a = (ns.a + '\\n' if ns.a else '') + " + q(c0) + " + fn['name'] + "
                   + q(c1) + " + args + " + q(c2) + " %}{% endfor %}{{ " + q(pre["assistant"][0]) + " + ns.a + "
                   + q(pre["assistant"][1]) + " }}"
                   "{% elif message['role'] == 'tool' %}{% if loop.first or loop_messages[loop.index0 - 1]['role'] != "
                   "'tool' %}{{ " + q(self._fmt["separator"] + o0) + " }}{% endif %}{{ " + q(r0) + " + message['content'] + "
                   + q(r1) + " }}{% if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' %}{{ " + q(o1)
                   + " }}{% endif %}{% endif %}{% endfor %}")
        return "".join(out)


class AutoTemplate:
    """The tokenizer's own chat template, split into turns by rendering growing prefixes.

    Turns are split on the rendered text, and each piece is tokenized separately (as a
    registry template's pieces are), so a training prompt has exactly the tokens of the
    generation prompt the chat worker will send. For ordinary tokenizers this equals
    ``apply_chat_template(tokenize=True)`` token for token (tested for the default model).
    """

    name = "auto"

    def __init__(self, tokenizer, default_system: str | None = None):
        if not isinstance(getattr(tokenizer, "chat_template", None), str) or not tokenizer.chat_template:
            raise TemplateError("template 'auto' needs a tokenizer with a chat template, and this tokenizer has "
                                f"none (a base model?); pick a registry template such as {', '.join(list(load_templates())[:4])} "
                                "or empty", field="template")
        self.tokenizer = tokenizer
        self._system_override = default_system
        self.default_system = default_system if default_system is not None else _probe_default_system(tokenizer)
        self.stop_words = _probe_stop_words(tokenizer)

    def _messages(self, messages: list[dict]) -> list[dict]:
        if self._system_override is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self._system_override}] + list(messages)
        return list(messages)

    def _text(self, messages: list[dict], generation: bool, tools: list[dict] | None = None) -> str:
        if uses_tools(messages, tools):
            reason = probe_tool_support(self.tokenizer)
            if reason:
                raise TemplateError(f"template 'auto': this model's own chat template has no tool support ({reason}); "
                                    f"pick a registry template with a tool format ({', '.join(tool_templates())})")
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)

    def turn_texts(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, str]]:
        """(prompt, response) text per turn: each prompt is what the generation prompt adds to the
        conversation so far (a user message, or tool results), each response what the answer adds to that."""
        messages = self._messages(messages)
        conversation_turns(messages, "assistant")
        pairs, so_far = [], ""
        for a in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            prompt, full = self._text(messages[:a], True, tools), self._text(messages[: a + 1], False, tools)
            if not prompt.startswith(so_far) or not full.startswith(prompt):
                raise TemplateError(f"the tokenizer's chat template is not prefix-stable (rendering turn {len(pairs) + 1} "
                                    "changes the text of earlier turns), so turns cannot be masked; pick a registry "
                                    "template instead of 'auto'", field="template")
            pairs.append((prompt[len(so_far):], full[len(prompt):]))
            so_far = full
        return pairs

    def encode_turns(self, tokenizer, messages: list[dict], tools: list[dict] | None = None
                     ) -> list[tuple[list[int], list[int]]]:
        """Each piece is tokenized on its own, as the generation prompt is at inference."""
        return [(_ids(tokenizer, p), _ids(tokenizer, r)) for p, r in self.turn_texts(messages, tools)]

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self._text(self._messages(messages), False, tools)

    def render_generation_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self._text(self._messages(messages), True, tools)

    def stop_token_ids(self, tokenizer) -> list[int]:
        return _stop_ids(tokenizer, self.stop_words)

    def jinja(self) -> str:
        return self.tokenizer.chat_template


_PROBE_USER, _PROBE_SYSTEM, _PROBE_ANSWER = "PROBE-USER-7f3a", "PROBE-SYSTEM-7f3a", "PROBE-ANSWER-7f3a"


def _probe_default_system(tokenizer) -> str:
    """The system prompt a chat template inserts when a conversation has none ('' if none)."""
    try:
        alone = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_USER}], tokenize=False)
        with_sys = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE_SYSTEM},
                                                  {"role": "user", "content": _PROBE_USER}], tokenize=False)
    except Exception:  # templates that reject a system role have no default system either
        return ""
    head = alone[: alone.find(_PROBE_USER)]
    s = with_sys.find(_PROBE_SYSTEM)
    before, after = with_sys[:s], with_sys[s + len(_PROBE_SYSTEM): with_sys.find(_PROBE_USER)]
    if s >= 0 and len(head) >= len(before) + len(after) and head.startswith(before) and head.endswith(after):
        return head[len(before): len(head) - len(after)]
    return ""


def _probe_stop_words(tokenizer) -> list[str]:
    """The special token that closes an assistant answer in the tokenizer's template, if any."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_USER},
                                              {"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False)
    except Exception:
        return []
    tail = _ids(tokenizer, text[text.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):])
    if tail and tail[0] in set(tokenizer.all_special_ids):
        return [tokenizer.convert_ids_to_tokens(tail[0])]
    return []


def get_template(name: str, tokenizer, default_system: str | None = None) -> Template | AutoTemplate:
    """A template by name: 'auto' (the tokenizer's own) or a registry entry; ``default_system`` overrides
    the template's default system prompt."""
    if name == "auto":
        return AutoTemplate(tokenizer, default_system)
    specs = load_templates()
    if name not in specs:
        raise TemplateError(f"unknown template '{name}' (known: {', '.join(template_names())})", field="template")
    return Template(specs[name], tokenizer, default_system)


def suggest_template(tokenizer) -> str:
    """'auto' for a model with a chat template ('default' without one); for one whose template 'auto' cannot split
    into turns, the registry template that renders it (see template_mismatch), when there is one."""
    if not getattr(tokenizer, "chat_template", None):
        return "default"
    own = _own_rendering(tokenizer)
    if own is not None and not own[0] and own[1]:
        return own[1][0]
    return "auto"


_PROBE_CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
]


def _prefix_stable(tokenizer) -> bool:
    """Whether 'auto' can split the tokenizer's own template into turns. Mistral v0.3's cannot: it writes the system
    prompt into the last instruction only, so a conversation's text changes as it grows."""
    try:
        AutoTemplate(tokenizer).turn_texts(_PROBE_CHAT)
    except TemplateError:
        return False
    except Exception:  # noqa: BLE001 - a template that fails otherwise is reported where it is used
        return True
    return True


def _own_rendering(tokenizer) -> tuple[bool, list[str], list[dict], str] | None:
    """(prefix-stable?, registry templates that render the probe as the model's own template does, the probe, its
    rendering); None when the model's template cannot render it. A template that is not prefix-stable is compared
    on a conversation without a system prompt, where such templates (Mistral's) are still consistent."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    stable = _prefix_stable(tokenizer)
    probe = _PROBE_CHAT if stable else _PROBE_CHAT[1:]
    try:
        own = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a broken template is reported where it is used
        return None
    same = [n for n, spec in load_templates().items() if Template(spec, tokenizer).render(probe) == own]
    return stable, same, probe, own


def template_mismatch(tokenizer, name: str) -> str | None:
    """A warning when a chat model is paired with a registry template that renders differently from its own, or
    with 'auto' when its own template cannot be split into turns. The advice names only templates that work: 'auto'
    is not offered for a template that is not prefix-stable."""
    found = _own_rendering(tokenizer)
    if found is None:
        return None
    stable, same, probe, own = found
    unstable = ("this model's own chat template is not prefix-stable (it rewrites earlier turns as a conversation "
                "grows), so template 'auto' cannot split its conversations into turns")
    closest = f"'{same[0]}', which renders conversations without a system prompt as the model's own does" if same else ""
    if name == "auto":
        if stable:
            return None
        return unstable[0].upper() + unstable[1:] + (f"; use template {closest}." if same else
                                                     "; pick the registry template of the model's family.")
    template = get_template(name, tokenizer)
    if template.render(probe) != own:
        better = (f"'auto' or '{same[0]}'" if same else "'auto'") if stable else closest
        return (f"Template '{name}' does not match this model's own chat template, so the fine-tuned model will see "
                "a format it was not trained on and may answer poorly; "
                + (f"use template {better}." if better else f"{unstable}, and no registry template matches it."))
    default = _probe_default_system(tokenizer)
    if stable and default != template.default_system:
        return (f"Template '{name}' has the model's chat format but not its default system prompt "
                f"({default!r}), so conversations without a system message differ from the model's own; "
                "use template 'auto'.")
    return None
