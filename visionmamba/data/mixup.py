"""Mixup/CutMix factory (timm ``Mixup``)."""

from __future__ import annotations

from timm.data import Mixup


def build_mixup(
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.1,
        num_classes: int,
) -> Mixup | None:
    """Builds the batch-level Mixup/CutMix of the official recipes.

    The returned callable maps ``(images (B, C, H, W), labels (B,))`` to mixed images and soft targets
    ``(B, num_classes)`` that already include label smoothing, so train with ``SoftTargetCrossEntropy``. timm needs
    an even batch size in ``"batch"`` mode, which ``drop_last=True`` training loaders guarantee for even batch sizes.

    Args:
        mixup_alpha: Beta(alpha, alpha) of Mixup; 0 disables Mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 disables CutMix.
        prob: Probability of mixing a batch.
        switch_prob: Probability of CutMix instead of Mixup when both are on.
        mode: ``"batch"``, ``"pair"`` or ``"elem"``: how often mixing parameters are drawn.
        label_smoothing: Smoothing folded into the soft targets.
        num_classes: Number of classes.

    Returns:
        A ``timm.data.Mixup``, or None when both alphas are 0 (the caller then uses cross-entropy with
        ``label_smoothing``).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
