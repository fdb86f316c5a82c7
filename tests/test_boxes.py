import itertools
import random

import numpy as np
import pytest

from dvsa.boxes import box_area, clip_box, group_boxes, iou, iou_matrix, is_degenerate, xywh_to_xyxy


def test_basic_geometry():
    assert xywh_to_xyxy(1, 2, 3, 4) == [1, 2, 4, 6]
    assert clip_box([-5, -5, 50, 20], 40, 30) == [0, 0, 40, 20]
    assert clip_box([50, 10, 60, 20], 40, 30) == [40, 10, 40, 20]
    assert is_degenerate([40, 10, 40, 20]) and not is_degenerate([0, 0, 1, 1])
    assert box_area([0, 0, 4, 5]) == 20 and box_area([3, 3, 1, 1]) == 0


def test_iou_by_hand():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)


def test_iou_matrix_matches_pairwise():
    rng = random.Random(0)
    boxes = []
    for _ in range(20):
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        boxes.append([x, y, x + rng.uniform(0, 30), y + rng.uniform(0, 30)])
    m = iou_matrix(np.array(boxes), np.array(boxes[:7]))
    for i, j in itertools.product(range(20), range(7)):
        assert m[i, j] == pytest.approx(iou(boxes[i], boxes[j]))


def test_group_boxes_by_hand():
    a = [0, 0, 10, 10]
    a2 = [0, 0, 10, 11]     # IoU(a, a2) = 100/110 = 0.909
    a3 = [1, 0, 10, 10]     # IoU(a, a3) = 0.9, IoU(a2, a3) = 90/110 = 0.818
    far = [50, 50, 60, 60]
    mid = [0, 0, 10, 14]    # IoU(a, mid) = 100/140 = 0.714, IoU(a2, mid)=110/140=0.786, IoU(a3, mid)=90/140=0.64
    groups = group_boxes([far, a, a2, a3, mid], 0.7)
    # a2 (index 2) touches a, a3, mid: the most neighbours -> seed; far stays alone
    assert groups[0][0] == [1, 2, 3, 4]
    assert groups[0][1] == pytest.approx(np.mean([a, a2, a3, mid], axis=0).tolist())
    assert groups[1] == ([0], [50.0, 50.0, 60.0, 60.0])
    assert group_boxes([], 0.7) == []


def test_group_boxes_partition_and_seed_property():
    rng = random.Random(1)
    for _ in range(30):
        boxes = []
        for _ in range(rng.randint(1, 12)):
            x, y = rng.uniform(0, 30), rng.uniform(0, 30)
            boxes.append([x, y, x + rng.uniform(5, 20), y + rng.uniform(5, 20)])
        groups = group_boxes(boxes, 0.7)
        members = sorted(i for g, _ in groups for i in g)
        assert members == list(range(len(boxes)))  # a partition
        for g, mean in groups:
            assert mean == pytest.approx(np.mean([boxes[i] for i in g], axis=0).tolist())
            # some member (the seed) overlaps every other member at >= 0.7
            assert any(all(iou(boxes[s], boxes[i]) >= 0.7 for i in g) for s in g)


def reference_groups(boxes, thr):
    """The greedy merge written the slow, obvious way."""
    left = list(range(len(boxes)))
    out = []
    while left:
        nbrs = {i: [j for j in left if i == j or iou(boxes[i], boxes[j]) >= thr] for i in left}
        seed = max(left, key=lambda i: (len(nbrs[i]), -i))
        out.append(nbrs[seed])
        left = [i for i in left if i not in nbrs[seed]]
    return out


def test_group_boxes_equals_reference():
    rng = random.Random(2)
    for _ in range(200):
        boxes = []
        for _ in range(rng.randint(1, 15)):
            x, y = rng.uniform(0, 20), rng.uniform(0, 20)
            boxes.append([x, y, x + rng.uniform(8, 14), y + rng.uniform(8, 14)])
        assert [g for g, _ in group_boxes(boxes, 0.7)] == reference_groups(boxes, 0.7)
