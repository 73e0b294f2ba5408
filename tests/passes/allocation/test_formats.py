"""Format choice: the fastest materialization measured no slower than fp32, else packed (fp32 speed)."""

from __future__ import annotations

from bitpass.passes.allocation.formats import choose, variants_to_measure


def gemm(mlp_model):
    return next(layer for layer in mlp_model.layers() if layer.op_type in ("Gemm", "MatMul"))


def test_a_faster_compute_format_is_chosen(mlp_model):
    layer = gemm(mlp_model)
    row = {(32, "fp32"): {1: 1.0, 64: 10.0}, (4, "matmulnbits"): {1: 0.5, 64: 9.0}}
    choice = choose(layer, 4, {layer.id: row})
    assert choice.format == "matmulnbits" and choice.seconds[1] == 0.5


def test_a_format_slower_at_any_batch_size_is_not(mlp_model):
    layer = gemm(mlp_model)
    row = {(32, "fp32"): {1: 1.0, 64: 10.0}, (4, "matmulnbits"): {1: 0.5, 64: 14.0}}
    choice = choose(layer, 4, {layer.id: row})
    assert choice.format == "packed" and choice.seconds == {1: 1.0, 64: 10.0}


def test_the_fastest_of_two_qualifying_formats_wins(mlp_model):
    layer = gemm(mlp_model)
    # mean ratio to fp32 over batch 1 and 64: qdq (0.9 + 0.5) / 2 = 0.70, matmulnbits (0.6 + 0.9) / 2 = 0.75
    row = {(32, "fp32"): {1: 1.0, 64: 10.0}, (8, "qdq"): {1: 0.9, 64: 5.0}, (8, "matmulnbits"): {1: 0.6, 64: 9.0}}
    assert choose(layer, 8, {layer.id: row}).format == "qdq"
    row[(8, "matmulnbits")] = {1: 0.4, 64: 8.0}  # now (0.4 + 0.8) / 2 = 0.60
    assert choose(layer, 8, {layer.id: row}).format == "matmulnbits"


def test_without_measurements_every_width_is_packed_and_modes_can_force(mlp_model):
    layer = gemm(mlp_model)
    assert choose(layer, 4, None).format == "packed"
    assert choose(layer, 4, None, mode="compute").format == "matmulnbits"
    assert choose(layer, 32, None).format == "fp32"


def test_only_compute_formats_are_timed_and_int8_compute_once_per_flavour(cnn_model):
    wanted = variants_to_measure(cnn_model.layers(), {layer.id: (32, 8, 4, 2) for layer in cnn_model.layers()})
    conv = cnn_model.layers()[0].id
    # int8 compute is the same kernel at 8-bit storage and at 2/4-bit storage widened at load: timed once
    assert wanted[conv] == [(8, "qdq-u8"), (8, "qdq-s8"), (4, "blocked-dq")]
    assert all(fmt != "packed" for variants in wanted.values() for _, fmt in variants)


def test_low_bit_storage_takes_int8_compute_when_int8_is_fastest(cnn_model):
    conv = cnn_model.layers()[1]
    row = {(32, "fp32"): {1: 1.0, 64: 10.0}, (8, "qdq-u8"): {1: 0.3, 64: 3.0}, (8, "qdq-s8"): {1: 0.8, 64: 8.0},
           (4, "blocked-dq"): {1: 2.0, 64: 20.0}}
    for bits in (8, 4, 2):
        choice = choose(conv, bits, {conv.id: row}, flavour="qdq-u8")
        assert (choice.format, choice.variant, choice.seconds[1]) == ("qdq", "qdq-u8", 0.3), bits
    # the model's flavour decides which timing counts: in S8S8 the same layer is not worth it at 2 bits
    assert choose(conv, 2, {conv.id: {**row, (8, "qdq-s8"): {1: 0.95, 64: 9.8}}}, flavour="qdq-s8").format == "packed"


def test_the_fastest_matmulnbits_block_is_chosen_and_recorded(mlp_model):
    layer = gemm(mlp_model)
    row = {(32, "fp32"): {1: 1.0, 64: 10.0}, (4, "matmulnbits-b32"): {1: 0.6, 64: 8.0},
           (4, "matmulnbits-b128"): {1: 0.4, 64: 6.0}}
    choice = choose(layer, 4, {layer.id: row})
    assert (choice.format, choice.block_size) == ("matmulnbits", 128)


def test_the_int8_flavour_is_the_one_fastest_over_all_layers(cnn_model):
    from bitpass.passes.allocation.formats import best_flavour

    table = {layer.id: {(32, "fp32"): {1: 1.0}, (8, "qdq-u8"): {1: 0.5}, (8, "qdq-s8"): {1: 0.7}}
             for layer in cnn_model.layers()}
    assert best_flavour(table) == "qdq-u8"
    first = cnn_model.layers()[0].id
    table[first] = {(32, "fp32"): {1: 1.0}, (8, "qdq-u8"): {1: 9.0}, (8, "qdq-s8"): {1: 0.5}}  # one outlier
    assert best_flavour(table) == "qdq-s8"
    assert best_flavour(None) is None
