"""pytest settings for the documentation folder.

``python -m pytest --doctest-glob="*.rst" doc/`` runs the ``>>>`` examples of
the hand-written pages.  The Sphinx configuration, the site's extensions and
everything a build generates (the example gallery copies the example scripts,
which must not be imported as modules) are left out.
"""

collect_ignore = ["conf.py"]
collect_ignore_glob = [
    "_build/*",
    "_ext/*",
    "_templates/*",
    "_benchmark_results/*",
    "auto_examples/*",
    "generated/*",
    "sg_execution_times.rst",
]
