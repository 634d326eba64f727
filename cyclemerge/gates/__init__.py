"""Hard-concrete (L0) gates over N aligned, frozen models.

- :mod:`cyclemerge.gates.distribution`: the hard-concrete distribution, which keys share a gate
  (the plan), and the merge of the models under given gate weights;
- :mod:`cyclemerge.gates.learning`: learning the gates on calibration data (``learn_gates``), or the
  uniform stand-in when they are disabled;
- :mod:`cyclemerge.gates.report`: reading a result: the gate table, per-layer weights, and the model
  weights REPAIR needs at each stat point.
"""

from cyclemerge.gates.distribution import GatePlan, HardConcrete, make_plan, merge_with_weights
from cyclemerge.gates.learning import GateResult, learn_gates, uniform_result
from cyclemerge.gates.report import gate_table, layer_weights, stat_point_weights

__all__ = ["GatePlan", "GateResult", "HardConcrete", "gate_table", "layer_weights", "learn_gates", "make_plan",
           "merge_with_weights", "stat_point_weights", "uniform_result"]
