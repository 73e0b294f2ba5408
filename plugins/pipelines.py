"""Named pipelines shipped with bitpass (registered under ``bitpass.pipelines``)."""

#: fp32 clean-up and fusion only: outputs stay equal to the input model's.
OPTIMIZE = "fold-constants,eliminate-dead-nodes,fuse"

#: the default compile: optimize, calibrate activation ranges, int8 QDQ.
DEFAULT = "fold-constants,eliminate-dead-nodes,fuse,calibrate(method=minmax),quantize"
