"""Named pipelines shipped with bitpass (registered under ``bitpass.pipelines``)."""

#: fp32 clean-up and fusion only: outputs stay equal to the input model's.
OPTIMIZE = "fold-constants,eliminate-dead-nodes,fuse"

#: the default compile: optimize, expand the function operators the runtime would expand (so calibration sees the
#: graph ORT quantizes; after fuse, which writes HardSwish), calibrate activation ranges, int8 QDQ (transformer-safe
#: scope: quant_scope).
DEFAULT = "fold-constants,eliminate-dead-nodes,fuse,inline-functions,calibrate(method=minmax),quantize"

#: mixed precision from measured sensitivity: per-layer bits under a budget (override with --budget),
#: each width in the fastest format measured on the target (never slower than fp32), packed weights'
#: rounding refined on the calibration data (AdaQuant/AdaRound-style) before they are written.
#: raise-opset gives the model the opset the chosen formats need (blocked int4 DQ: 21) right after allocation.
MIXED = ("fold-constants,eliminate-dead-nodes,fuse,inline-functions,calibrate(method=minmax),sensitivity,"
         "allocate-bits(budget=avg-bits=4),raise-opset,refine-rounding,quantize")

#: one size budget spent on both bit widths and removed channels (override with --budget size=...)
JOINT = ("fold-constants,eliminate-dead-nodes,fuse,inline-functions,calibrate(method=minmax),sensitivity,"
         "allocate-joint(budget=size=0.25x),raise-opset,quantize")
