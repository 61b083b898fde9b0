"""The longest test files run first: with one file per worker (pytest-xdist --dist loadfile), a long
file handed out last would leave the other workers idle while it runs."""

from __future__ import annotations

# minutes on one CI core: the quickstart's two 150-step trainings, the edit demo, the toy model, the job
LONGEST_FIRST = ["test_quickstart.py", "test_toy_edit.py", "test_toy_model.py", "test_job_benchmark.py",
                 "test_reliability.py", "test_supervise.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
