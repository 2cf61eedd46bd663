"""Test-wide settings.

Under CI (``CI`` set in the environment) hypothesis runs derandomized: the
same examples every run, so a red CI means the code changed, not the draw.
Locally every run draws fresh examples, which is how new bugs are found;
raise the counts with PQSK_ORACLE_EXAMPLES / PQSK_STATEFUL_EXAMPLES /
PQSK_FUZZ_EXAMPLES.  The child interpreters of test_fuzz.py and
test_stateful.py inherit the environment, and so this profile.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
