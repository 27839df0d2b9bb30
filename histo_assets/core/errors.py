"""The root of the project's own errors.

Every error the project raises on purpose (a bad params key, an unusable
slide, a hypernetwork file the WebUI would refuse, a failed dvc command)
derives from :class:`HistoAssetsError`, so the CLI, a sensor or a lab's own
script can tell them from bugs with one ``except``. Each also keeps the
built-in base it had (``ValueError``, ``LookupError``...), so existing
handlers still catch it.
"""


class HistoAssetsError(Exception):
    """An input, file or tool the pipeline cannot use; the message names it."""


class BaseModelError(HistoAssetsError, ValueError):
    """A base-model setting that cannot be used; raised before any weights load.

    Here rather than beside the loader so that code which only names the
    base model (fingerprints, resources) need not import diffusers.
    """
