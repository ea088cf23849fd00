"""Internal-state probes: activation hooks, the refusal direction, one-pass trajectory readings, predictivity."""

from trajalign.probe.direction import RefusalDirection, select_direction
from trajalign.probe.predictivity import predictivity
from trajalign.probe.trajectory import DepthReading, probe_trajectories

__all__ = ["DepthReading", "RefusalDirection", "predictivity", "probe_trajectories", "select_direction"]
