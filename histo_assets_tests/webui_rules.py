"""The AUTOMATIC1111 WebUI's published rules, restated for tests from the specification alone.

``shared/reference/a1111-hypernetwork.md`` §2 (the restricted loader every
``.pt`` and ``.pt.optim`` passes through) and §8b (what its PNG Info paste
makes of a text, and k-diffusion's sigmas). Nothing here imports the
project's own parsers or schedules: a test that checks our files with our own
code would prove nothing about the WebUI.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

# §2: the names the WebUI accepts inside a .pt zip archive.
ALLOWED_ENTRY = re.compile(r"(?P<dir>[^/]+)/(data\.pkl|data/\d+|version|byteorder|\.data/serialization_id)")
_STORAGE_CLASSES = ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool")
# §2: plain containers, torch's rebuild helpers and storage classes, and numpy scalar helpers.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
} | {("torch", f"{kind}Storage") for kind in _STORAGE_CLASSES}


class RefusedByWebui(Exception):
    """What the WebUI's checker would refuse, and why."""


class _Placeholder:
    def __init__(self, *args, **kwargs):
        pass


class _OrderedDict(dict):
    """Takes the attributes a pickled OrderedDict may carry (a state dict's ``_metadata``)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowed globals; storages are never read, only their references checked."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedByWebui(f"global '{module}/{name}' is forbidden")
        return _OrderedDict if (module, name) == ("collections", "OrderedDict") else _Placeholder

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise RefusedByWebui(f"persistent id {pid!r} is not a storage")
        return _Placeholder()


def check_loadable_by_webui(path: Path) -> None:
    """Raise :class:`RefusedByWebui` where the WebUI's restricted loader would refuse ``path``."""
    if not zipfile.is_zipfile(path):
        raise RefusedByWebui(f"{path.name}: not a zip archive (only zip-format files are written here)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = [name for name in names if not ALLOWED_ENTRY.fullmatch(name)]
        if bad:
            raise RefusedByWebui(f"{path.name}: bad file inside: {bad}")
        folders = {ALLOWED_ENTRY.fullmatch(name)["dir"] for name in names}
        if len(folders) != 1:
            raise RefusedByWebui(f"{path.name}: entries in several folders {sorted(folders)}")
        (folder,) = folders
        with archive.open(f"{folder}/data.pkl") as pickled:
            _RestrictedUnpickler(pickled).load()


# §8b: one `Key: value` pair of the last line; a value is JSON-quoted or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_HYPERNET_TOKEN = re.compile(r"<hypernet:([^:>]+):([^>]+)>")


def webui_paste(text: str) -> dict[str, str]:
    """What the WebUI's PNG Info paste fills in from ``text``: prompt, negative prompt and every key.

    Includes the legacy rule that turns a ``Hypernet`` key into one more
    ``<hypernet:...>`` token appended to the prompt, and the defaults it
    assumes for a missing ``RNG`` (GPU) and ``Schedule type`` (Automatic).
    """
    lines = text.strip().split("\n")
    pairs = dict((key.strip(), json.loads(value) if value.startswith('"') else value.strip())
                 for key, value in _PAIR.findall(lines[-1]))
    if len(pairs) < 3:
        pairs = {}
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **pairs}
    if "Hypernet" in result:
        result["Prompt"] += f"<hypernet:{result['Hypernet']}:{result.get('Hypernet strength', '1.0')}>"
    result.setdefault("RNG", "GPU")
    result.setdefault("Schedule type", "Automatic")
    return result


def hypernet_tokens(prompt: str) -> list[tuple[str, str]]:
    return _HYPERNET_TOKEN.findall(prompt)


def k_diffusion_sigmas(beta_start: float, beta_end: float, timesteps: int, steps: int) -> torch.Tensor:
    """k-diffusion's ``get_sigmas(steps)`` for an LDM ``linear`` (√-linear) schedule, as the WebUI computes it.

    LDM builds ᾱ in float64 and stores it as a float32 buffer; k-diffusion derives
    float32 sigmas from that buffer and interpolates log σ at
    ``linspace(T-1, 0, steps)``, then appends 0.
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(timesteps - 1, 0, steps)
    low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def main(folders: list[str]) -> int:
    """Check every ``.pt`` and ``.pt.optim`` under the given folders; CI runs it over the demo's data."""
    paths = sorted(path for folder in folders for pattern in ("*.pt", "*.pt.optim") for path in Path(folder).rglob(pattern))
    refused = []
    for path in paths:
        try:
            check_loadable_by_webui(path)
        except RefusedByWebui as error:
            refused.append(f"{path}: {error}")
    print(f"webui loading rules: {len(paths) - len(refused)} of {len(paths)} files pass")
    print("\n".join(refused))
    return 1 if refused or not paths else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
