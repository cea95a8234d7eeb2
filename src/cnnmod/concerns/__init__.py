"""Step 3: which elements each concern (class) needs, the 2-logit head, and MC-BLN backtracking."""

from .backtrack import backtrack_removed
from .channeling import channel_head, head_totals, mc_bln_features
from .identify import active_masks, channel_scores

__all__ = ["active_masks", "backtrack_removed", "channel_head", "channel_scores", "head_totals", "mc_bln_features"]
