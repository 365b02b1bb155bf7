"""The SAM3 concept benchmark compares like with like and prints its documented last line."""


import pytest

from bench_script import load_benchmark


@pytest.fixture(scope='module')
def bench():
    return load_benchmark('bench_sam3_concepts')


def test_naive_recipe_post_processes_as_many_instances_as_the_engine(bench):
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine

    engine = Sam3ConceptEngine.from_config(bench.bench_config(), seed=0, score_threshold=0.0,
                                           max_instances=bench.MAX_INSTANCES)
    engine.set_concepts(bench.CONCEPTS[:2])
    frame = bench.frames(1)[0]
    detected = engine.detect(frame)
    naive = bench.naive(engine, frame, bench.CONCEPTS[:2])
    # Random weights, threshold 0: every one of the 16 queries passes, so without the cut
    # the naive side would upsample 16 masks per phrase to the frame and the engine 4.
    assert [len(r['scores']) for r in naive] == [bench.MAX_INSTANCES] * 2
    assert [len(detected[p]) for p in bench.CONCEPTS[:2]] == [bench.MAX_INSTANCES] * 2


@pytest.mark.slow
def test_quick_run_prints_the_three_ratios(bench, capsys):
    bench.main(['--quick'])
    out = capsys.readouterr().out
    print(out)
    name_values = [f.split('=') for f in out.strip().splitlines()[-1].split()]
    assert [name for name, _ in name_values] == [
        'cached_over_naive', 'four_concepts_over_one', 'hybrid_over_every_frame']
    assert all(float(value) > 0 for _, value in name_values)
