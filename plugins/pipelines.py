"""Named pipelines shipped with bitpass (registered under ``bitpass.pipelines``)."""

#: fp32 clean-up and fusion only: outputs stay equal to the input model's (up to fp32 rounding). Transformer
#: graphs also get ONNX Runtime's transformer fusions, attention included, kept when not slower on the target, and
#: ORT's own load-time fusions (SkipLayerNormalization) are turned off where they measure slower.
OPTIMIZE = ("fold-constants,eliminate-dead-nodes,fuse,"
            "fuse-transformer(attention=true,embed_layer_norm=true,session_fusions=true)")

#: the default compile: optimize, expand the function operators the runtime would expand (so calibration sees the
#: graph ORT quantizes; after fuse, which writes HardSwish), ONNX Runtime's transformer fusions where they are not
#: slower, calibrate activation ranges, int8 where it pays on the target: the int8 flavour (U8S8 / S8S8 / 7-bit
#: weights, or dynamic int8 for transformers) and the layers that stay fp32 are chosen by timing whole candidate
#: artifacts (``quantize(search=true)``), within the transformer-safe int8 scope (``quant_scope``).
DEFAULT = "fold-constants,eliminate-dead-nodes,fuse,inline-functions,fuse-transformer,calibrate(method=minmax),quantize"

#: mixed precision from measured sensitivity: per-layer bits under a budget (override with --budget),
#: each width in the fastest format measured on the target (never slower than fp32), packed weights'
#: rounding refined on the calibration data (AdaQuant/AdaRound-style) before they are written.
#: raise-opset gives the model the opset the chosen formats need (blocked int4 DQ: 21) right after allocation.
MIXED = ("fold-constants,eliminate-dead-nodes,fuse,inline-functions,fuse-transformer,calibrate(method=minmax),"
         "sensitivity,allocate-bits(budget=avg-bits=4),raise-opset,refine-rounding,quantize")

#: one size budget spent on both bit widths and removed channels (override with --budget size=...)
JOINT = ("fold-constants,eliminate-dead-nodes,fuse,inline-functions,calibrate(method=minmax),sensitivity,"
         "allocate-joint(budget=size=0.25x),raise-opset,quantize")

#: decoder language models (what ``default`` and ``--budget avg-bits=N`` become for a graph with token ids in and
#: logits out): weight-only GPTQ against each layer's calibration Hessian, written as ONNX Runtime MatMulNBits so
#: the weights stay 4-bit in memory and decode runs on ORT's low-bit kernels; embedding tables 8-bit. Group 64: on
#: the real-weight byte LM +0.27 % bits/byte at 0.159x the fp32 weight bytes (group 32: +0.31 % at 0.176x; ORT's
#: RTN block 32: +0.59 % at 0.228x); 4-bit embedding tables missed the quality gate there.
DECODER = "fold-constants,eliminate-dead-nodes,quantize-weights(method=gptq,bits=4,group_size=64,embeddings=8)"
