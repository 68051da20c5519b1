"""The deployments without Ray: the encoder's settings are a small frozen value made from the serve
section, and each deployment class, as Serve pickled it (by value, when it was decorated), still finds
every module-level name its methods use."""

from __future__ import annotations

import asyncio
import dataclasses
import dis
import pickle
import types

import numpy as np
import pytest
from ray import cloudpickle
from ray.serve import batching

from coral import schemas as S
from coral.config import DeploymentConfig, ServeConfig
from coral.models import loader, retrievers
from coral.serve import api, deployments
from coral.serve.deployments import Encoder, Index, Ingress, ReplicaSettings
from coral.serve.metrics import EncoderMetrics
from coral.serve.pacing import BatchWait
from tests.unit.models.test_loader import images


def test_replica_settings_come_from_the_serve_section():
    cfg = ServeConfig(device="cpu", dtype="bfloat16", batch_size=8, batch_wait_s=0.01)
    cfg = dataclasses.replace(cfg, encoder=DeploymentConfig(num_cpus=3.5))
    settings = ReplicaSettings.of(cfg)
    assert settings == ReplicaSettings(
        threads=3, device="cpu", dtype="bfloat16", batch_size=8, batch_wait_s=0.01
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.threads = 4  # type: ignore[misc]
    assert len(pickle.dumps(settings)) < 1000


def test_a_fractional_cpu_share_still_gets_one_thread():
    cfg = dataclasses.replace(ServeConfig(), encoder=DeploymentConfig(num_cpus=0.25))
    assert ReplicaSettings.of(cfg).threads == 1


def globals_used(code: types.CodeType) -> set[str]:
    """The global names a function's code (and its nested functions', lambdas', comprehensions') loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= globals_used(const)
    return names


def functions_of(cls: type):
    for klass in cls.__mro__:
        if klass.__module__ != deployments.__name__:
            continue
        for value in vars(klass).values():
            fn = getattr(value, "__func__", value)  # staticmethod, classmethod
            fn = getattr(fn, "__wrapped__", fn)  # serve.batch
            if isinstance(fn, types.FunctionType):
                yield klass, fn


@pytest.mark.parametrize("deployment", [Encoder, Index, Ingress], ids=lambda d: d.name)
def test_each_pickled_deployment_finds_the_module_names_it_uses(deployment):
    """Serve pickles a deployment class by value when it is decorated: a helper defined below the class
    in the module is missing from its methods' globals in the replica (a NameError when it runs)."""
    cls = cloudpickle.loads(deployment._replica_config.serialized_deployment_def)
    module_names = set(vars(deployments))
    missing = {
        f"{klass.__name__}.{fn.__name__}: {name}"
        for klass, fn in functions_of(cls)
        for name in globals_used(fn.__code__) & module_names
        if name not in fn.__globals__
    }
    assert not missing, sorted(missing)


def bare_encoder(sizes: list[int]):
    """The encoder class as Serve runs it, without a model: its batches' sizes go to ``sizes``, and each
    query's "hits" are its text."""
    cls = Encoder.func_or_class
    encoder = cls.__new__(cls)
    encoder.pacing, encoder.metrics, encoder.turn = BatchWait(0.005), EncoderMetrics(), asyncio.Lock()
    encoder.counts = {"batches": 0, "requests": 0, "refused": 0}
    encoder.run_many.set_max_batch_size(16)

    def work(items):
        sizes.append(len(items))
        return [np.zeros(2)] * len(items), list(range(len(items))), [[q.text] * k for _, q, k, _ in items]

    encoder._work = work
    return encoder


def test_a_requests_several_queries_run_in_one_batch_in_order(monkeypatch):
    # outside a replica: no Serve context to read max_ongoing_requests from for the batch queue's warning
    monkeypatch.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda _: None
    )
    sizes: list[int] = []
    encoder = bare_encoder(sizes)

    async def main():
        many = await encoder.search([api.Query(t, []) for t in "abcde"], [1, 2, 1, 1, 3])
        one = await encoder.search([api.Query("z", [])], [1])
        return many, one

    many, one = asyncio.run(main())
    assert many == [["a"], ["b", "b"], ["c"], ["d"], ["e", "e", "e"]] and one == [["z"]]
    assert sizes == [5, 1] and encoder.pacing.in_flight == 0


def test_a_batchs_queries_are_processed_together_and_a_bad_one_refused_alone(tiny_models):
    retriever = retrievers.make("coral", loader.load_processor(str(tiny_models["qwen2_vl"])))
    cls = Encoder.func_or_class
    encoder = cls.__new__(cls)
    encoder.embedder = types.SimpleNamespace(retriever=retriever)
    encoder.image_features, encoder.rgb = None, lambda raw: raw
    calls = []
    together = retriever.queries
    retriever.queries = lambda inputs: calls.append(len(inputs)) or together(inputs)
    good = [api.Query(f"a {S.IMAGE_SLOT} in red", [img]) for img in images(2)]
    bad = api.Query(f"{S.IMAGE_SLOT} and {S.IMAGE_SLOT}", [images(1)[0]])  # two slots, one image
    for items, refused in (([*good, api.Query("text", [])], []), ([good[0], bad, good[1]], [1])):
        out = [None] * len(items)
        features = encoder._features([("query", q, 1, 0.0) for q in items], out)
        assert [i for i, v in enumerate(out) if isinstance(v, api.Refused)] == refused
        assert sorted(features) == [i for i in range(len(items)) if i not in refused]
        for i, f in features.items():
            want = retriever.query(items[i].text, items[i].images)
            assert all(np.array_equal(f[k], want[k]) for k in want)
    assert calls == [3, 3]  # one call a batch; the second failed, and its queries went one at a time
