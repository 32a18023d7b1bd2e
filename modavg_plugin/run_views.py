"""What the adapters show of their :class:`~modavg_plugin.AveragingRun`, read-only."""

from typing import Any, Dict, List, Optional

from .averages import MovingAverage
from .run import AveragingRun
from .snapshots import PostHocSnapshots

__all__ = ["RunViews"]


class RunViews:
    """What the adapters show of their :class:`~modavg_plugin.AveragingRun` (``self.run``), read-only."""

    run: AveragingRun

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One dict per epoch: ``epoch_no``, the losses or metrics measured, and with ``compare_raw`` the raw weights'."""
        return self.run.history

    @property
    def moving_average(self) -> Optional[MovingAverage]:
        """The moving average (``None`` before training starts, or without one)."""
        return self.run.moving_average

    @property
    def posthoc_snapshots(self) -> Optional[PostHocSnapshots]:
        """The post-hoc EMAs kept with ``posthoc`` (``None`` otherwise)."""
        return self.run.posthoc_snapshots

    @property
    def choice(self) -> List[Dict[str, Any]]:
        """With ``"auto"``, after training: each candidate's name, ``sigma_rel``, ``validation_loss``, and which was ``chosen``."""
        return self.run.choice

    @property
    def num_updates(self) -> int:
        """Optimiser updates so far, resumed ones included."""
        return self.run.num_updates
