"""The pool a split's MERIT queries are composed from: its products in id order, indexed by class, by
(class, key) and by (class, key, value), so that a query's positives and hard negatives are counted over a
few short arrays, never by a scan of the pool."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from coral import schemas as S
from coral.merit.cards import is_missing

Constraint = tuple[str, str]  # (key, value)
_EMPTY = np.zeros(0, dtype=np.int64)


class ProductIndex:
    """The pool, in id order, with the sorted positions of the products of each class, of each (class, key)
    and of each (class, key, value), so that positives are counted over a few short arrays, never by a scan
    of the pool. One split per pool."""

    def __init__(self, products: Iterable[Mapping]):
        rows = sorted(products, key=lambda p: str(p[S.ID]))
        self.ids = [str(p[S.ID]) for p in rows]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("duplicate product ids")
        splits = {p.get(S.SPLIT) or "train" for p in rows}
        if len(splits) > 1:
            raise ValueError(f"products from several splits {sorted(splits)}: compose one split at a time")
        self.split = splits.pop() if splits else "train"
        self.position = {pid: i for i, pid in enumerate(self.ids)}
        self.classes = [str(p[S.CLASS]) for p in rows]
        self.titles = [p.get(S.TITLE) or "" for p in rows]
        self.languages = [p.get(S.LANGUAGE) or "" for p in rows]
        self.groups = [str(p.get(S.GROUP_ID) or p[S.ID]) for p in rows]
        self.attrs = [
            {k: str(v) for k, v in (p.get(S.ATTRIBUTES) or {}).items() if not is_missing(v)} for p in rows
        ]
        by_class, with_key, matching, members = (defaultdict(list) for _ in range(4))
        for i, (cls, attrs) in enumerate(zip(self.classes, self.attrs, strict=True)):
            by_class[cls].append(i)
            members[self.groups[i]].append(i)
            for k, v in attrs.items():
                with_key[(cls, k)].append(i)
                matching[(cls, k, v)].append(i)
        self.by_class = {c: np.asarray(v) for c, v in by_class.items()}
        self.with_key = {ck: np.asarray(v) for ck, v in with_key.items()}
        self.matching = {ckv: np.asarray(v) for ckv, v in matching.items()}
        self.keys = {c: sorted(k for cc, k in with_key if cc == c) for c in by_class}
        self.members = {g: np.asarray(v) for g, v in members.items()}
        self.multi_groups = sorted(g for g, v in members.items() if len(v) >= 2)

    def __len__(self) -> int:
        return len(self.ids)

    def tally(self, cls: str, constraints: Sequence[Constraint]) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions of the products of ``cls`` that satisfy every (key, value), and of those that
        satisfy all but exactly one: each product counted once per (key, value) it has."""
        if not constraints:
            return self.by_class.get(cls, _EMPTY), _EMPTY
        lists = [self.matching.get((cls, k, v), _EMPTY) for k, v in dict.fromkeys(constraints)]
        if len(lists) == 1:
            return lists[0], np.setdiff1d(self.by_class.get(cls, _EMPTY), lists[0], assume_unique=True)
        values, counts = np.unique(np.concatenate(lists), return_counts=True)
        return values[counts == len(lists)], values[counts == len(lists) - 1]


def as_index(products: Iterable[Mapping] | ProductIndex) -> ProductIndex:
    return products if isinstance(products, ProductIndex) else ProductIndex(products)
