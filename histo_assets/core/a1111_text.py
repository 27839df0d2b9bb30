"""AUTOMATIC1111's PNG ``parameters`` text: written by generation, read back by lineage.

Apart from ``sampling`` so that ``histo-assets lineage``, which runs in a plain
clone of a release, can check an image's text without importing torch and
diffusers (seconds on every call); nothing here may import them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histo_assets.core.sampling import GenerationSettings

# The PNG text chunk key A1111 writes and its PNG Info tab reads.
PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111 names a file by the first 10 hex digits of its SHA-256 ("Model hash").
SHORT_HASH_LENGTH = 10


def short_hash(sha256: str) -> str:
    """A1111's short form of a file's SHA-256: its "Model hash", ``sd_checkpoint`` and sidecar ``hash``."""
    return sha256[:SHORT_HASH_LENGTH]
# Our initial noise is drawn on the CPU; the WebUI assumes GPU noise for a text without an RNG key (§8b).
RNG_SOURCE = "CPU"
# Keys the WebUI no longer writes: its paste turns a `Hypernet` key into a second <hypernet:...> token,
# so images written with them (before 2026-11) name the hypernetwork twice. Lineage still reads them.
LEGACY_HYPERNET_KEYS = ("Hypernet", "Hypernet hash", "Hypernet strength")


@dataclass(frozen=True)
class WebuiSampler:
    """What the WebUI calls a sampler, the sigma schedule it gets here, and the one its "Automatic" picks.

    ``schedule`` is None for DDIM, which steps by timesteps, not sigmas.
    """

    name: str
    schedule: str | None
    webui_default_schedule: str | None

    @property
    def schedule_type(self) -> str | None:
        """The ``Schedule type`` value to write: only where ours is not the WebUI's default."""
        if self.schedule == self.webui_default_schedule:
            return None
        return SCHEDULE_NAMES[self.schedule]


# The WebUI's names of the sigma schedules offered here.
SCHEDULE_NAMES = {"uniform": "Uniform", "karras": "Karras"}

# Every sampler params.yaml can choose, by its params.yaml key. DPM++ 2M keeps the uniform
# schedule it always had here, which the WebUI only uses when told (its "Automatic" is Karras).
WEBUI_SAMPLERS = {
    "euler": WebuiSampler("Euler", "uniform", "uniform"),
    "euler_a": WebuiSampler("Euler a", "uniform", "uniform"),
    "ddim": WebuiSampler("DDIM", None, None),
    "dpm++_2m": WebuiSampler("DPM++ 2M", "uniform", "karras"),
    "lms": WebuiSampler("LMS", "uniform", "uniform"),
}
SAMPLER_NAMES = {key: sampler.name for key, sampler in WEBUI_SAMPLERS.items()}


def _format_number(value: float) -> str:
    """A1111 prints whole CFG scales without a decimal point ("7", "7.5")."""
    return f"{float(value):g}"


def _quote(value: object) -> str:
    """JSON-quote values that would break the comma-separated line, as the PNG Info parser expects."""
    text = str(value)
    if any(ch in text for ch in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def hypernetwork_token(name: str, multiplier: float) -> str:
    """The WebUI's extra-network prompt syntax that activates a hypernetwork at a strength."""
    return f"<hypernet:{name}:{float(multiplier)}>"


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    settings: GenerationSettings,
    seed: int,
    model_hash: str,
    model_name: str,
    hypernetwork_name: str | None = None,
) -> str:
    """The text the current WebUI stores in a PNG's ``parameters`` chunk (§8b).

    Line 1 is the prompt, with the ``<hypernet:NAME:MULT>`` token appended when
    a hypernetwork is used (the WebUI removes the token before encoding, so
    ``prompt`` is the text actually encoded); the token is the only mention of
    the hypernetwork, so a paste activates it once. Line 2, left out when
    empty, is the negative prompt. The last line holds ``Key: value`` pairs in
    the WebUI's order; values with commas, colons or quotes are JSON-quoted.
    ``RNG: CPU`` tells a paste to draw the noise as we did.
    """
    first = prompt
    if hypernetwork_name is not None:
        first = f"{prompt} {hypernetwork_token(hypernetwork_name, settings.multiplier)}".lstrip()
    sampler = WEBUI_SAMPLERS[settings.sampler]
    pairs: list[tuple[str, object]] = [
        ("Steps", settings.steps),
        ("Sampler", sampler.name),
        ("Schedule type", sampler.schedule_type),
        ("CFG scale", _format_number(settings.cfg_scale)),
        ("Seed", int(seed)),
        ("Size", f"{settings.width}x{settings.height}"),
        ("Model hash", model_hash),
        ("Model", model_name),
        ("RNG", RNG_SOURCE),
    ]
    lines = [first]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs if value is not None))
    return "\n".join(lines)


# One `Key: value` pair: a key starting with a letter, then a JSON-quoted value
# or anything up to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# Fewer pairs than this and the last line is taken as part of the prompt.
_MIN_PAIRS = 3


def _parse_pairs(line: str) -> dict[str, str] | None:
    pairs: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PAIR.match(line, position)
        if match is None or match.end() == position:
            return None
        key, value = match.group(1).strip(), match.group(2).strip()
        pairs[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs if len(pairs) >= _MIN_PAIRS else None


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Inverse of :func:`a1111_parameters`: ``Prompt``, ``Negative prompt`` and every ``Key: value`` pair.

    Values stay strings, as written; the prompt keeps any ``<hypernet:...>``
    token. Multi-line prompts are kept whole, as in the WebUI.
    """
    lines = text.rstrip("\n").split("\n")
    pairs = _parse_pairs(lines[-1]) if len(lines) > 1 else None
    if pairs is not None:
        lines = lines[:-1]
    else:
        pairs = {}
    negative_at = next((i for i, line in enumerate(lines) if line.startswith(NEGATIVE_PREFIX)), len(lines))
    negative = "\n".join(lines[negative_at:])[len(NEGATIVE_PREFIX):].strip() if negative_at < len(lines) else ""
    return {"Prompt": "\n".join(lines[:negative_at]), "Negative prompt": negative, **pairs}
