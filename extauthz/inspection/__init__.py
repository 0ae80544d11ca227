"""Payload inspection: the machinery of the ``inspect:`` policy section (extauthz/checks/inspect.py).

- ``decode``: the decode pipeline (percent, HTML, JS/JSON escapes, NFKC) and the extra text forms
  some rules read (SQL comments removed, shell quoting removed, Log4j lookups resolved);
- ``rules``: the built-in rules (RE2 patterns, ids, scores, sensitivity levels, targets);
- ``ssrf``: URL hosts parsed as HTTP clients parse them and classified (loopback, private,
  metadata, ...), with the allow-list;
- ``targets``: the values of a request and the locations findings name (never the values);
- ``engine``: the inspector compiled per policy: limits, one RE2 pass per request, locating,
  exclusions, scores.

The body is read through the shared view (extauthz/payload/), the request through the Request object.
"""
