"""PolicyTest documents: test cases kept beside the policies and run by ``extauthz test``.

A PolicyTest says what the sidecar must decide for requests written by hand. It can sign the
tokens its requests carry from test key files and claims (``issuers``, ``tokens``), fix the clock
(``clock``, and ``advance`` per case), and expect response headers as well as the decision. The
contract is docs/policy.md, "Testing policies".

- :mod:`extauthz.policytest.model` reads and checks the documents (``extauthz validate`` reports
  every problem with file and line, as it does for policies);
- :mod:`extauthz.policytest.tokens` signs the tokens;
- :mod:`extauthz.policytest.runner` runs the cases against a loaded policy set.
"""

from extauthz.policytest.model import Expectation, HeaderExpectation, TestCase, TestSuite, check_tests, compile_suites
from extauthz.policytest.runner import CaseResult, load_for_tests, run_suites

__all__ = [
    "CaseResult",
    "Expectation",
    "HeaderExpectation",
    "TestCase",
    "TestSuite",
    "check_tests",
    "compile_suites",
    "load_for_tests",
    "run_suites",
]
