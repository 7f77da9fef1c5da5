"""The host plan of the split-KV tile scheduler (flash_mla.host_plan), without a GPU.

Contract checked here. ``host_plan(seqlens, rows_per_kv_head, h_kv, num_sms)`` returns
``(meta, num_splits)``: ``meta`` is a list of P rows of 8 ints, ``num_splits`` a list of b + 1
ints, with ``P = max(1, num_sms // (h_kv * ceil(rows_per_kv_head / 64)))``.

Row p = [begin_req, begin_page, end_req, end_page (exclusive), begin_split, 0, 0, 0]. Part p
decodes, for each request i in begin_req..end_req, the pages
``[(begin_page if i == begin_req else 0), (end_page if i == end_req else pages(i)))`` with
``pages(i) = ceil(L_i / 64)``; ``end_req < begin_req`` means an empty part. The split index of
that segment is ``begin_split`` for i == begin_req and 0 otherwise; request i's splits are
numbered 0 .. num_splits[i+1] - num_splits[i] - 1.

Properties: every page of every request is decoded exactly once; every request (also L == 0)
has at least one segment; segments of requests with L > 0 hold at least one page; split
indices of a request are exactly 0..n-1; num_splits is a prefix sum from 0 with
num_splits[b] <= b + P; a request is cut only after an even number of its pages (the kernels
take pages in pairs); and the plan is balanced: with cost(segment) = its pages rounded up to
even + 5, no part costs more than ceil(total / P) + 5 + 1, total = sum_i (even(pages(i)) + 5).
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

import flash_mla

PAGE = 64
FIXED_COST = 5
META_INTS = 8


def pages_of(seqlen: int) -> int:
    return -(-seqlen // PAGE) if seqlen > 0 else 0


def paired(pages: int) -> int:
    """A segment's pages as the plan charges them: in pairs (an odd count costs one page more)."""
    return pages + (pages & 1)


def expected_parts(rows_per_kv_head: int, h_kv: int, num_sms: int) -> int:
    return max(1, num_sms // (h_kv * -(-rows_per_kv_head // 64)))


def plan(seqlens: Sequence[int], rows: int, h_kv: int, num_sms: int):
    meta, splits = flash_mla.host_plan(list(seqlens), rows, h_kv, num_sms)
    return [[int(x) for x in row] for row in meta], [int(x) for x in splits]


def check_plan(seqlens: Sequence[int], rows: int, h_kv: int, num_sms: int,
               meta: List[List[int]], splits: List[int]) -> None:
    """Asserts every property of the module docstring."""
    ctx = f"(b={len(seqlens)}, rows={rows}, h_kv={h_kv}, num_sms={num_sms})"
    b = len(seqlens)
    pages = [pages_of(L) for L in seqlens]
    parts = expected_parts(rows, h_kv, num_sms)
    assert len(meta) == parts, f"{ctx} {len(meta)} parts, expected {parts}"
    assert len(splits) == b + 1, f"{ctx} num_splits has {len(splits)} entries"

    # Segments of each request: (begin_page, end_page, split, part).
    segments: Dict[int, List[Tuple[int, int, int, int]]] = {i: [] for i in range(b)}
    part_cost = []
    for p, row in enumerate(meta):
        assert len(row) == META_INTS, f"{ctx} row {p} has {len(row)} ints"
        begin_req, begin_page, end_req, end_page, begin_split = row[:5]
        assert row[5:] == [0, 0, 0], f"{ctx} row {p} = {row}: fields 5..7 must be 0"
        cost = 0
        if end_req >= begin_req:
            assert 0 <= begin_req and end_req < b, f"{ctx} row {p} = {row}: requests out of range"
            for i in range(begin_req, end_req + 1):
                start = begin_page if i == begin_req else 0
                stop = end_page if i == end_req else pages[i]
                split = begin_split if i == begin_req else 0
                assert 0 <= start <= stop <= pages[i], (
                    f"{ctx} row {p} = {row}: request {i} pages [{start}, {stop}) outside "
                    f"[0, {pages[i]}]")
                segments[i].append((start, stop, split, p))
                cost += paired(stop - start) + FIXED_COST
        part_cost.append(cost)

    assert splits[0] == 0, f"{ctx} num_splits[0] = {splits[0]}"
    for i in range(b):
        segs = sorted(segments[i])
        n = splits[i + 1] - splits[i]
        assert segs, f"{ctx} request {i} (L={seqlens[i]}) has no segment"
        assert n == len(segs), (f"{ctx} request {i}: num_splits says {n} splits, the parts hold "
                                f"{len(segs)} segments {segs}")
        assert sorted(s[2] for s in segs) == list(range(n)), (
            f"{ctx} request {i}: split indices {[s[2] for s in segs]} are not 0..{n - 1}")
        if pages[i] > 0:
            for start, stop, _, p in segs:
                assert stop > start, f"{ctx} request {i} (L={seqlens[i]}): empty segment in part {p}"
        # Exactly-once coverage of [0, pages): sorted segments tile the range.
        covered = 0
        for start, stop, _, p in segs:
            assert start == covered, (f"{ctx} request {i} (L={seqlens[i]}, {pages[i]} pages): "
                                      f"segments {segs} leave a gap or overlap at page {covered}")
            covered = stop
        assert covered == pages[i], (f"{ctx} request {i}: pages covered up to {covered} of "
                                     f"{pages[i]} ({segs})")
        # Pages go in pairs: a request is only ever cut after an even number of its pages.
        for start, stop, _, p in segs:
            assert stop == pages[i] or stop % 2 == 0, (
                f"{ctx} request {i}: segment [{start}, {stop}) in part {p} ends at an odd page "
                f"inside the request ({segs})")
    assert splits[b] <= b + parts, f"{ctx} {splits[b]} splits > b + P = {b + parts}"

    total = sum(paired(p) + FIXED_COST for p in pages)
    bound = -(-total // parts) + FIXED_COST + 1
    worst = max(range(parts), key=lambda p: part_cost[p])
    assert part_cost[worst] <= bound, (
        f"{ctx} part {worst} ({meta[worst]}) costs {part_cost[worst]} > ceil({total}/{parts}) + "
        f"{FIXED_COST} + 1 = {bound}; part costs {part_cost}")


# ----------------------------------------------------------------------------------------------
# random batches
# ----------------------------------------------------------------------------------------------


def random_lengths(kind: str, b: int, rng: random.Random) -> List[int]:
    if kind == "uniform100k":
        return [rng.randint(0, 100000) for _ in range(b)]
    if kind == "mostly_zero":
        return [0 if rng.random() < 0.7 else rng.randint(1, 100000) for _ in range(b)]
    if kind == "all_zero":
        return [0] * b
    if kind == "tiny":
        return [rng.randint(0, 130) for _ in range(b)]
    if kind == "one_long":
        lens = [rng.randint(0, 200) for _ in range(b)]
        lens[rng.randrange(b)] = rng.randint(50000, 100000)
        return lens
    if kind == "normal8k":
        return [min(max(int(rng.gauss(8192, 4096)), 0), 100000) for _ in range(b)]
    if kind == "page_edges":
        return [rng.choice([0, 1, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097]) for _ in range(b)]
    raise ValueError(kind)


KINDS = ["uniform100k", "mostly_zero", "all_zero", "tiny", "one_long", "normal8k", "page_edges"]
SMS = [132, 78, 1, 3, 16]
CONFIGS_PER_PARAM = 12


@pytest.mark.parametrize("num_sms", SMS, ids=[f"sms{n}" for n in SMS])
@pytest.mark.parametrize("kind", KINDS)
def test_random_plans(kind, num_sms):
    rng = random.Random(f"{kind}-{num_sms}")
    for _ in range(CONFIGS_PER_PARAM):
        b = rng.choice([1, 2, rng.randint(1, 300), rng.randint(1, 300)])
        rows = rng.choice([1, 16, 20, 64, 65, 128, 256, 512, rng.randint(1, 512)])
        h_kv = rng.randint(1, 8)
        seqlens = random_lengths(kind, b, rng)
        meta, splits = plan(seqlens, rows, h_kv, num_sms)
        check_plan(seqlens, rows, h_kv, num_sms, meta, splits)


# Hand-picked shapes: one part, more parts than requests, far more requests than parts, the
# benchmark's reference shapes.
SPECIAL = {
    "b1_L0_one_part": ([0], 16, 1, 1),
    "b1_L0_many_parts": ([0], 16, 1, 132),
    "b1_L1": ([1], 128, 1, 132),
    "b1_L100000": ([100000], 128, 1, 132),
    "b2_L64_65": ([64, 65], 1, 1, 132),
    "b300_all_zero": ([0] * 300, 16, 1, 132),
    "b300_L1": ([1] * 300, 16, 1, 132),
    "imbalanced_spec_case": ([4641, 45118, 1730, 1696], 64, 1, 132),
    "b128_L8192": ([8192] * 128, 128, 1, 132),
    "b128_L32768_sq2": ([32768] * 128, 256, 1, 132),
    "b3_more_sms_than_pages": ([65, 1, 130], 1, 1, 132),
    "b5_zero_tail": ([5000, 0, 0, 0, 0], 16, 1, 78),
    "b5_zero_head": ([0, 0, 0, 0, 5000], 16, 1, 78),
}


@pytest.mark.parametrize("seqlens, rows, h_kv, num_sms", list(SPECIAL.values()), ids=list(SPECIAL))
def test_special_plans(seqlens, rows, h_kv, num_sms):
    meta, splits = plan(seqlens, rows, h_kv, num_sms)
    check_plan(seqlens, rows, h_kv, num_sms, meta, splits)


def test_zero_length_requests_keep_one_split_each():
    seqlens = [0, 700, 0, 0, 3000, 0]
    for num_sms in (1, 3, 132):
        meta, splits = plan(seqlens, 16, 1, num_sms)
        check_plan(seqlens, 16, 1, num_sms, meta, splits)
        for i, L in enumerate(seqlens):
            if L == 0:
                assert splits[i + 1] - splits[i] == 1, (num_sms, i, splits)


def test_long_request_is_split_across_parts():
    """A single request far longer than a part's share is divided among the parts: no
    segment may exceed the balance bound, so it needs at least pages / (share + 1) of them."""
    seqlens = [100000]
    meta, splits = plan(seqlens, 128, 1, 132)
    parts = expected_parts(128, 1, 132)
    check_plan(seqlens, 128, 1, 132, meta, splits)
    pages = pages_of(100000)
    share = -(-(pages + FIXED_COST) // parts)
    assert splits[1] - splits[0] >= -(-pages // (share + 1)) > 1


@pytest.mark.parametrize("num_sms", [1, 3, 78, 132, 1000])
def test_number_of_parts(num_sms):
    for rows in (1, 63, 64, 65, 128, 129, 512):
        for h_kv in (1, 2, 3, 8):
            meta, splits = plan([10, 0, 5000], rows, h_kv, num_sms)
            assert len(meta) == expected_parts(rows, h_kv, num_sms), (rows, h_kv, num_sms)
            assert len(splits) == 4


def test_return_types_and_determinism():
    seqlens = [0, 1, 64, 65, 9000, 123]
    meta, splits = flash_mla.host_plan(seqlens, 64, 1, 132)
    assert isinstance(meta, (list, tuple)) and isinstance(splits, (list, tuple))
    assert all(len(row) == META_INTS for row in meta)
    assert all(isinstance(x, int) for row in meta for x in row)
    assert all(isinstance(x, int) for x in splits)
    again = flash_mla.host_plan(list(seqlens), 64, 1, 132)
    assert [list(r) for r in again[0]] == [list(r) for r in meta]
    assert list(again[1]) == list(splits)


def test_accepts_cpu_tensor_seqlens():
    seqlens = [3, 0, 777, 64, 65, 12345]
    from_list = plan(seqlens, 32, 2, 78)
    meta, splits = flash_mla.host_plan(torch.tensor(seqlens, dtype=torch.int32), 32, 2, 78)
    assert ([[int(x) for x in row] for row in meta], [int(x) for x in splits]) == from_list
