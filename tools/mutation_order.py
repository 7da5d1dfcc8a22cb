"""pytest plugin for tools/mutation.py: run the selected tests in the order of the module's mapped test files.

mutmut hands pytest the tests that cover a mutant as an unordered set; with ``-x`` the first failing test ends the run,
so putting the fast unit-test files first kills most mutants in seconds instead of after a training test.
The order comes from EMBEDFORGE_MUTATION_TEST_ORDER (comma-separated test files); within a file, definition order.
"""

from __future__ import annotations

import os


def pytest_collection_modifyitems(session, config, items):
    order = [f for f in os.environ.get("EMBEDFORGE_MUTATION_TEST_ORDER", "").split(",") if f]
    if not order:
        return
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
