"""Chat templates: a conversation rendered as the model's own template renders it (jinja2,
sandboxed, as transformers' `apply_chat_template` does), and the characters of its assistant
turns, which are what a chat trains on.

The template is `data.chat_template` (a .jinja file), else the tokenizer's own
(`chat_template.jinja` or the `chat_template` of `tokenizer_config.json` beside its
tokenizer.json), else `BUILTIN_TEMPLATE`. Assistant turns are found from the template's
`{% generation %}` blocks where it has them; otherwise by rendering each assistant turn's
prefix (the conversation before it with the generation prompt, then with it) and requiring
both to begin the whole rendering.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import DataError

# jaxlm's own template: readable role markers, and sequences that start with the end-of-document
# token as jaxlm's documents do. An assistant turn ends with it too, so the model learns to stop.
BUILTIN_TEMPLATE = (  # no literal newlines: trim_blocks would eat those after a tag
    "{{ eos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}"
    "{% if message['content'] is defined %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] is defined %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use characters that bracket what a {% generation %} block rendered; removed from the
# conversation first, so a message cannot forge them.
_START, _END = "\U000f0000", "\U000f0001"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class _GenerationSpans(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the block's output, bracketed by markers that
    `ChatTemplate.render_with_spans` turns into character spans."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

    def _bracket(self, caller: Any) -> str:
        return f"{_START}{caller()}{_END}"


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not, and templates expect that.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationSpans, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


class ChatTemplate:
    """A compiled chat template and the special-token variables it is rendered with."""

    def __init__(self, source: str, variables: dict[str, str], name: str):
        self.source, self.name = source, name  # name: where it came from, for messages
        self.variables = variables
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source))
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise DataError(
                f"the chat template {name} is not valid jinja ({error.message}, line {error.lineno}); fix it or set data.chat_template"
            ) from None

    def __reduce__(self) -> tuple:
        # Grain's worker processes get the pipeline pickled; a compiled template is not picklable.
        return ChatTemplate, (self.source, self.variables, self.name)

    def render(
        self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None
    ) -> str:
        """The conversation as text (raises jinja2.TemplateError where the template refuses it);
        `tools`: the JSON schemas of the tools the chat offers, for templates that show them."""
        return self.render_with_spans(messages, add_generation_prompt=add_generation_prompt, tools=tools)[0]

    def render_with_spans(
        self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the [start, end) characters of its generation blocks."""
        # tools and documents are always passed, None when absent, as transformers passes them:
        # templates test `tools is not none`, which an undefined variable would pass.
        marked = self._template.render(
            messages=_plain(messages),
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )
        text, spans, start = [], [], None
        length = 0
        for piece in re.split(f"([{_START}{_END}])", marked):
            if piece == _START:
                start = length
            elif piece == _END:
                spans.append((start, length))
            else:
                text.append(piece)
                length += len(piece)
        return "".join(text), spans

    def assistant_spans(
        self, messages: list[dict], tools: list | None = None
    ) -> tuple[str, list[tuple[int, int]] | None]:
        """The rendered conversation and the [start, end) characters of its assistant turns,
        each with the end-of-turn token(s) the template writes after it; None where the
        template gives no way to find them."""
        text, spans = self.render_with_spans(messages, tools=tools)
        if self.has_generation_blocks:
            return text, [span for span in spans if span[1] > span[0]] or None
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:index], add_generation_prompt=True, tools=tools)
                through = self.render(messages[: index + 1], tools=tools)
            except jinja2.TemplateError:
                return text, None
            if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
                return text, None
            # What follows the turn's end-of-turn token (a newline, say) belongs to no turn.
            spans.append((len(before), len(before) + len(through[len(before) :].rstrip())))
        return text, spans or None


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as the template sees them: keys whose value is null left out (as transformers
    does), and no span markers in their text."""
    return [
        {
            key: value.replace(_START, "").replace(_END, "") if isinstance(value, str) else value
            for key, value in message.items()
            if value is not None
        }
        for message in messages
    ]


def load_chat_template(config: DataConfig, tokenizer: Tokenizer) -> ChatTemplate:
    """data.chat_template, else the tokenizer's own template, else the built-in one."""
    settings = _tokenizer_config(config)
    variables = {name: _token_text(settings[name]) for name in _SPECIAL_TOKENS if settings.get(name)}
    chosen = config.chat_template
    if chosen == "builtin" or (chosen is None and config.tokenizer == "byte"):
        return _builtin(tokenizer)
    if chosen is not None:
        if not storage.path(chosen).is_file():
            raise DataError(f"data.chat_template={chosen} is not a file; point it at a .jinja chat template")
        source = storage.read_bytes(chosen).decode("utf-8")
        return ChatTemplate(source, {"eos_token": tokenizer.eos_token, **variables}, chosen)
    own = _own_template(config, settings)
    if own is None:
        return _builtin(tokenizer)
    return ChatTemplate(own, {"eos_token": tokenizer.eos_token, **variables}, f"of {config.tokenizer}")


def _builtin(tokenizer: Tokenizer) -> ChatTemplate:
    return ChatTemplate(BUILTIN_TEMPLATE, {"eos_token": tokenizer.eos_token}, "built into jaxlm")


def _beside_tokenizer(config: DataConfig, name: str) -> str:
    return str(storage.path(config.tokenizer).parent / name)


def _tokenizer_config(config: DataConfig) -> dict[str, Any]:
    if config.tokenizer == "byte":
        return {}
    path = _beside_tokenizer(config, "tokenizer_config.json")
    if not storage.path(path).is_file():
        return {}
    try:
        return json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error.msg}); fix it or remove it") from None


def _own_template(config: DataConfig, settings: dict[str, Any]) -> str | None:
    """The tokenizer's chat template: chat_template.jinja beside it (as transformers saves
    templates now), else tokenizer_config.json's, a string or a list of named templates."""
    jinja_file = _beside_tokenizer(config, "chat_template.jinja")
    if storage.path(jinja_file).is_file():
        return storage.read_bytes(jinja_file).decode("utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise DataError(
                f"the tokenizer_config.json beside data.tokenizer={config.tokenizer} has chat templates "
                f"{sorted(map(str, named))} but none named 'default'; set data.chat_template to a .jinja file"
            )
        template = named["default"]
    return template if isinstance(template, str) else None


def _token_text(token: str | dict) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)
