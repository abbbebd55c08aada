"""Old config key names that still work for this release: each use logs one deprecation line naming the new key.

``RENAMED`` maps an old dotted key to its new name. ``ktransfer.training.config`` resolves every key it reads (YAML
files, ``key=value`` overrides, a run folder's ``config.yaml`` or a checkpoint's config) through ``canonical``, so a
run folder written with the old names loads as the same config and resumes as the same run. The renames (issue 26):

- ``objective.lam`` -> ``objective.divergence_weight``: the weight ``w`` of ``(1 - w) * NLL + w * D``. TRL's GKD
  names its *on-policy fraction* ``lmbda`` (ktransfer's ``objective.on_policy_fraction``); a key that reads as
  "lambda" next to it in one ``TransferGKDTrainer`` call invited the mix-up. (torchtune's ``kd_ratio`` is the same
  weight, but "kd" would be wrong for KA and the other divergences.)
- ``objective.objective`` -> ``objective.kind``: the key no longer repeats its section.
- ``data.train_limit`` / ``data.valid_subset`` -> ``data.max_train_samples`` / ``data.max_eval_samples``: one
  spelling for "the first N examples", the Hugging Face example scripts' (``max_train_samples``,
  ``max_eval_samples``, ``max_predict_samples``; ``reproduce``'s ``test_limit`` is now ``max_predict_samples``).
"""

from __future__ import annotations

import logging

RENAMED = {
    "objective.lam": "objective.divergence_weight",
    "objective.objective": "objective.kind",
    "data.train_limit": "data.max_train_samples",
    "data.valid_subset": "data.max_eval_samples",
}
# reproduce's experiment options (ktransfer.experiments.options)
RENAMED_OPTIONS = {"test_limit": "max_predict_samples"}
# keyword arguments of TransferTrainer / TransferGKDTrainer (ktransfer.integrations.divergence_weight_of)
RENAMED_KEYWORDS = {"lam": "divergence_weight"}

log = logging.getLogger(__name__)


def canonical(key: str, source: str, renamed: dict[str, str] = RENAMED) -> str:
    """``key``'s current name; an old name logs one deprecation warning naming ``source`` and the new key."""
    new = renamed.get(key)
    if new is None:
        return key
    log.warning("%s: %s is deprecated and will be removed in the next release; use %s", source, key, new)
    return new


def old_name(key: str) -> str:
    """The name ``key`` had before the renames (itself when it was never renamed)."""
    return next((old for old, new in RENAMED.items() if new == key), key)
