"""A sample's ``groups`` (DESIGN.md's shard contract): its regions merged at IoU >= 0.7, each
with the mean box and every member's caption kept as a reference, for evaluation. ``dvsa
prepare`` and ``dvsa snippets`` both write them with :func:`region_groups`."""

from __future__ import annotations

from typing import Sequence

from dvsa.boxes import group_boxes

IOU_GROUP = 0.7


def region_groups(regions: Sequence[dict], threshold: float = IOU_GROUP) -> list[dict]:
    """``regions`` (``{id, box, raw, tokens}``) grouped by :func:`dvsa.boxes.group_boxes`:
    ``{box, region_ids, refs, tokens}`` per group, a lone region keeping its own box."""
    groups = []
    for members, box in group_boxes([r["box"] for r in regions], threshold):
        groups.append({"box": regions[members[0]]["box"] if len(members) == 1 else [round(v, 2) for v in box],
                       "region_ids": [regions[i]["id"] for i in members],
                       "refs": [regions[i]["raw"] for i in members],
                       "tokens": [regions[i]["tokens"] for i in members]})
    return groups
