"""lost_jax.measure.hlo on hand-written HLO text: loops weighted by trip count, dot and
convolution FLOPs, bytes, collectives and their ring traffic (no TPU needed)."""

import pytest

from lost_jax.measure import hlo

# A step-shaped module: a while loop of 5 trips whose body runs a fused dot, an all-gather and
# a reduce-scatter fusion (the TPU compiler's form), then a cross-chip all-reduce and a
# conditional whose costly branch holds a dot.
MODULE = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: bf16[8,16], p1: bf16[16,32]) -> f32[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (q0: f32[64,32]) -> f32[16,32] {
  %q0 = f32[64,32]{1,0} parameter(0)
  %all-reduce.9 = f32[64,32]{1,0} all-reduce(%q0), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %c0 = s32[] constant(0)
  ROOT %ds = f32[16,32]{1,0} dynamic-slice(%all-reduce.9, %c0, %c0), dynamic_slice_sizes={16,32}
}

%body (param: (s32[], bf16[8,16], bf16[16,32], f32[16,32])) -> (s32[], bf16[8,16], bf16[16,32], f32[16,32]) {
  %param = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = bf16[8,16]{1,0} get-tuple-element(%param), index=1
  %w = bf16[16,32]{1,0} get-tuple-element(%param), index=2
  %acc = f32[16,32]{1,0} get-tuple-element(%param), index=3
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %g = f32[64,32]{1,0} all-gather(%acc), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[16,32]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}, f32[16,32]{1,0}) tuple(%next, %x, %w, %rs)
}

%cond (cparam: (s32[], bf16[8,16], bf16[16,32], f32[16,32])) -> pred[] {
  %cparam = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}, f32[16,32]{1,0}) parameter(0)
  %limit = s32[] constant(5)
  %ci = s32[] get-tuple-element(%cparam), index=0
  ROOT %lt = pred[] compare(%ci, %limit), direction=LT
}

%apply (ap: f32[4,4]) -> f32[4,4] {
  %ap = f32[4,4]{1,0} parameter(0)
  ROOT %d2 = f32[4,4]{1,0} dot(%ap, %ap), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%skip (sp: f32[4,4]) -> f32[4,4] {
  ROOT %sp = f32[4,4]{1,0} parameter(0)
}

ENTRY %main (x0: bf16[8,16], w0: bf16[16,32], a0: f32[16,32], v: f32[128], m: f32[4,4], ok: pred[]) -> f32[128] {
  %x0 = bf16[8,16]{1,0} parameter(0)
  %w0 = bf16[16,32]{1,0} parameter(1)
  %a0 = f32[16,32]{1,0} parameter(2)
  %v = f32[128]{0} parameter(3)
  %m = f32[4,4]{1,0} parameter(4)
  %ok = pred[] parameter(5)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %init = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}, f32[16,32]{1,0}) tuple(%start, %x0, %w0, %a0)
  %loop = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}, f32[16,32]{1,0}) while(%init), condition=%cond, body=%body
  %upd = f32[4,4]{1,0} conditional(%ok, %m, %m), true_computation=%apply, false_computation=%skip
  ROOT %ar = f32[128]{0} all-reduce(%v), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
}
"""


def test_a_loop_body_counts_once_per_trip_and_the_costly_branch_once():
  weighted, once = hlo.step_costs(MODULE, num_devices=8)
  dot = 2 * 8 * 32 * 16                 # [8,16] @ [16,32]
  branch = 2 * 4 * 4 * 4                # the conditional's apply branch
  assert once.flops == dot + branch
  assert weighted.flops == 5 * dot + branch
  assert weighted.unknown_loops == 0
  assert weighted.count == {"all-gather": 5, "all-reduce": 1, "reduce-scatter": 5,
                            "all-to-all": 0, "collective-permute": 0}
  # all-gather: the gathered result; reduce-scatter / all-reduce: the full operand (f32).
  assert weighted.coll_bytes["all-gather"] == 5 * 64 * 32 * 4
  assert weighted.coll_bytes["reduce-scatter"] == 5 * 64 * 32 * 4
  assert weighted.coll_bytes["all-reduce"] == 128 * 4
  # Ring traffic: AG and RS over groups of 4 move 3/4 of the bytes, the AR over 'axis_1'
  # (4 chips) twice 3/4.
  ring = 0.75 * (5 * 64 * 32 * 4 * 2) + 2 * 0.75 * 128 * 4
  assert weighted.ici_bytes == pytest.approx(ring)


def test_bytes_count_operands_and_results_outside_fusions_and_seconds_take_the_max():
  weighted, once = hlo.step_costs(MODULE, num_devices=8, flops_per_s=1e3, bytes_per_s=1e6)
  # Per trip: the s32 add (two operands + result), the fused dot at its boundary (bf16
  # operands, f32 result), the all-gather (operand + result) and the reduce-scatter fusion
  # (its body reads the whole operand, writes the slice).
  add, fused = 3 * 4, 8 * 16 * 2 + 16 * 32 * 2 + 8 * 32 * 4
  gather, rs = 16 * 32 * 4 + 64 * 32 * 4, 64 * 32 * 4 + 16 * 32 * 4
  # Outside: the counter's copy, the all-reduce, the apply branch's f32 [4,4] dot.
  copy, all_reduce, branch_dot = 4 + 4, 128 * 4 * 2, 3 * 4 * 4 * 4
  per_trip, outside = add + fused + gather + rs, copy + all_reduce + branch_dot
  assert (per_trip, outside) == (22796, 1224)
  assert weighted.bytes == 5 * per_trip + outside and once.bytes == per_trip + outside
  # Each instruction takes max(FLOPs / 1e3, bytes / 1e6): the dots are compute-bound here.
  trip_s = (2 * 8 * 32 * 16) / 1e3 + (add + gather + rs) / 1e6
  outside_s = (copy + all_reduce) / 1e6 + (2 * 4 * 4 * 4) / 1e3
  assert weighted.seconds == pytest.approx(5 * trip_s + outside_s)
  assert once.seconds == pytest.approx(trip_s + outside_s)


def test_a_loop_whose_trip_count_cannot_be_read_counts_once_and_is_reported():
  text = MODULE.replace("%start = s32[] copy(%zero)", "%start = s32[] add(%zero, %zero)")
  weighted, _ = hlo.step_costs(text, num_devices=8)
  assert weighted.unknown_loops == 1 and weighted.flops == 2 * 8 * 32 * 16 + 2 * 4 * 4 * 4


def test_weight_gradient_convolution_counts_only_taps_inside_the_unpadded_input():
  # The TPU compiler's x^T g as a convolution over a spatial dim of size 1 padded to 4 taps:
  # each of the 4 output positions meets the one real input position exactly once.
  text = """HloModule m

ENTRY %e (l: bf16[128,128,1], r: bf16[4,128,128]) -> f32[4,128,128] {
  %l = bf16[128,128,1]{1,0,2} parameter(0)
  %r = bf16[4,128,128]{1,2,0} parameter(1)
  ROOT %c = f32[4,128,128]{1,2,0} convolution(%l, %r), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=fb0_0oi->0fb
}
"""
  weighted, _ = hlo.step_costs(text, num_devices=1)
  assert weighted.flops == 2 * (128 * 128) * 128 * 4     # 4 outputs x 128 x 128, 128 deep
  plain = """HloModule m

ENTRY %e (l: bf16[4,128,128], r: bf16[128,4096,1]) -> f32[4,128,4096] {
  %l = bf16[4,128,128]{2,1,0} parameter(0)
  %r = bf16[128,4096,1]{1,0,2} parameter(1)
  ROOT %c = f32[4,128,4096]{2,1,0} convolution(%l, %r), window={size=1}, dim_labels=0bf_io0->0bf
}
"""
  weighted, _ = hlo.step_costs(plain, num_devices=1)
  assert weighted.flops == 2 * 4 * 128 * 4096 * 128      # a [512, 128] @ [128, 4096] dot


@pytest.mark.parametrize("groups, size", [("replica_groups={{0,1},{2,3}}", 2),
                                          ("replica_groups=[16,16]<=[256]", 16),
                                          ("replica_groups=mesh['a'=4,'b'=2] {'a','b'}", 8),
                                          ("replica_groups={}", 64)])
def test_group_size_reads_each_replica_group_form(groups, size):
  assert hlo.group_size(groups + ", use_global_device_ids=true", 64) == size


def test_type_bytes_sums_tuples_and_ignores_layouts():
  assert hlo.type_bytes("(s32[]{:T(128)}, bf16[2,256,2048]{2,1,0:T(8,128)(2,1)S(1)})") == \
      4 + 2 * 2 * 256 * 2048
  assert hlo.type_dims("f32[24,5461,512]{2,1,0:T(8,128)}") == [24, 5461, 512]


def test_an_all_reduce_of_a_zero_padded_shard_is_counted_as_a_gather_done_by_all_reduce():
  # The TPU compiler's FSDP gather at 64+ chips: the shard written into zeros (in a fusion
  # whose root is the dynamic-update-slice, or unfused), then an all-reduce over the chips.
  text = """HloModule m

%pad (z: bf16[64,32], s: bf16[16,32], i: s32[]) -> bf16[64,32] {
  %z = bf16[64,32]{1,0} parameter(0)
  %s = bf16[16,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = bf16[64,32]{1,0} dynamic-update-slice(%z, %s, %i, %c)
}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %r = bf16[] add(%a, %b)
}

ENTRY %e (s0: bf16[16,32], g: bf16[64,32], i0: s32[]) -> (bf16[64,32], bf16[64,32], bf16[64,32]) {
  %s0 = bf16[16,32]{1,0} parameter(0)
  %g = bf16[64,32]{1,0} parameter(1)
  %i0 = s32[] parameter(2)
  %zero = bf16[] constant(0)
  %zeros = bf16[64,32]{1,0} broadcast(%zero), dimensions={}
  %f = bf16[64,32]{1,0} fusion(%zeros, %s0, %i0), kind=kLoop, calls=%pad
  %c0 = s32[] constant(0)
  %u = bf16[64,32]{1,0} dynamic-update-slice(%zeros, %s0, %i0, %c0)
  %ar1 = bf16[64,32]{1,0} all-reduce(%f), replica_groups={{0,1,2,3}}, to_apply=%add
  %ar2 = (bf16[64,32]{1,0}, bf16[64,32]{1,0}) all-reduce(%u, %g), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (bf16[64,32]{1,0}, bf16[64,32]{1,0}, bf16[64,32]{1,0}) tuple(%ar1, %ar2)
}
"""
  weighted, _ = hlo.step_costs(text, num_devices=4)
  full = 64 * 32 * 2
  assert weighted.count["all-reduce"] == 2 and weighted.coll_bytes["all-reduce"] == 3 * full
  # %ar1's operand and the first of %ar2's are padded shards; %g (a gradient) is not.
  assert weighted.padded_gathers == 2 and weighted.padded_gather_bytes == 2 * full


def test_allocations_move_nothing_and_async_copies_and_slices_count_each_end_once():
  text = """HloModule m

ENTRY %e (x: f32[64,32]) -> f32[64,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %buf = f32[64,32]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %cs = (f32[64,32]{1,0}, f32[64,32]{1,0:S(1)}, u32[]) copy-start(%x)
  %cd = f32[64,32]{1,0:S(1)} copy-done(%cs)
  %ss = ((f32[64,32]{1,0}), f32[16,32]{1,0:S(1)}, s32[]) slice-start(%x), slice={[0:16], [0:32]}
  %sd = f32[16,32]{1,0:S(1)} slice-done(%ss)
  ROOT %y = f32[64,32]{1,0} add(%cd, %buf)
}
"""
  weighted, _ = hlo.step_costs(text, num_devices=1)
  full, part = 64 * 32 * 4, 16 * 32 * 4
  # copy: read + write (+ its 4-byte context); slice: the slice read + written (+ context);
  # the add: two operands + result; the allocation and the -done halves: nothing.
  assert weighted.bytes == (2 * full + 4) + 2 * (part + 4) + 3 * full
