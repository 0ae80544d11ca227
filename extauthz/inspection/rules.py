"""The built-in rules: this project's own, written for API payloads.

What to detect was learnt from attack write-ups and from the kinds of attacks OWASP CRS covers; the
patterns are ours, tuned to fire on attack syntax rather than on words (an API's free text says
"select", "union", "drop", "alert" and "O'Brien" all day). Every pattern is RE2 syntax (linear time,
no backreferences, no look-around), written in lower case and matched case-insensitively against the
decoded text (see decode.py); ``(?m)`` is on, so ``^`` and ``$`` are the edges of one value.

Levels: 1 = the default sensitivity, only syntax that benign API traffic does not produce; 2 and 3
add weaker signals (more detections, more false positives). Scores: 5 is enough to deny alone at the
default threshold; 2-4 need company.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BUILTIN_RULES", "DETECTORS", "FORMS", "KINDS", "Rule"]

#: Where a value comes from. ``name``: query, form and multipart field names (JSON keys are body).
KINDS = ("path", "query", "name", "header", "cookie", "body", "filename")
#: Text forms rules can ask for besides the decoded text: SQL comments removed, shell quoting
#: removed, Log4j lookups resolved.
FORMS = ("sql", "cmd", "lookup")
DETECTORS = ("log4shell", "sqli", "xss", "traversal", "cmdi", "ssrf", "xxe", "crlf")

_ALL = frozenset(KINDS)
_INPUT = frozenset({"path", "query", "name", "cookie", "body"})
_VALUES = frozenset({"query", "cookie", "body"})
_FILES = frozenset({"path", "query", "body", "filename"})
_HEADERS = frozenset({"header"})


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    detector: str
    level: int
    score: int
    pattern: str
    targets: frozenset[str]
    #: Forms besides the decoded text the pattern also runs on.
    forms: frozenset[str] = frozenset()
    description: str = ""


_LONG_REPEAT = re.compile(r"\{([01]),(\d{2,})\}")


def _rule(id: str, detector: str, level: int, score: int, targets: frozenset[str], pattern: str,
          forms: tuple[str, ...] = (), description: str = "") -> Rule:  # fmt: skip
    # Long counted repetitions ({0,64}) multiply the states of RE2's DFA, which then thrashes on
    # crafted input; within one value (no newline) an open-ended repetition detects the same.
    pattern = _LONG_REPEAT.sub(lambda m: "*" if m.group(1) == "0" else "+", pattern)
    return Rule(id, detector, level, score, "(?mi)" + pattern, targets, frozenset(forms), description)


_SQL_SEP = r"(?:\s|/\*[^*]*\*+(?:[^/*][^*]*\*+)*/|\(|\+)"  # whitespace, a C comment, '(' or '+' between keywords
# A command separator must be there: a value that merely is "id", "env" or "ls" (a field named id!)
# is not an injection.
_CMD_START = r"(?:[;&|`\n]|\$\(|\|\||&&)\s*(?:/(?:usr/)?(?:local/)?s?bin/)?"

BUILTIN_RULES: tuple[Rule, ...] = (
    # --- Log4Shell and lookup injection ------------------------------------------------------------
    _rule("log4shell-jndi", "log4shell", 1, 5, _ALL, r"\$\{\s*jndi\s*:|\x{e000}jndi:", ("lookup",),
          "a ${jndi:...} lookup, also when spelt through nested lookups, defaults, case or escapes"),
    _rule("log4shell-nested-lookup", "log4shell", 1, 5, _ALL,
          r"\$\{[^}\n]{0,64}\$\{\s*(?:lower|upper|env|sys|date|::-|[a-z0-9]*:[^}\n]{0,32}:-)",
          description="a lookup built from nested lookups (${${lower:j}ndi:...}, ${${::-j}...})"),
    _rule("log4shell-lookup", "log4shell", 1, 3, _ALL,
          r"\$\{\s*(?:env|sys|java|ctx|main|date|bundle|docker|k8s|kubernetes|spring|web|log4j|marker|jvmrunargs"
          r"|base64|lower|upper|map|sd|event|hostname)\s*:",
          description="a Log4j lookup other than jndi (reads environment, system properties, ...)"),
    _rule("java-el-injection", "log4shell", 1, 5, _INPUT,
          r"\$\{[^}\n]{0,40}(?:t\s*\(\s*java\.lang|new\s+java\.|getruntime\s*\(|processbuilder|\.exec\s*\()"
          r"|#\{[^}\n]{0,40}(?:t\s*\(|getruntime|\.exec\s*\()",
          description="Java/Spring expression-language code execution"),
    _rule("java-code-injection", "log4shell", 1, 5, _ALL,
          r"\bjava\.lang\.(?:runtime|processbuilder|reflect\.|class\b)|\bjavax\.script\.scriptenginemanager"
          r"|\borg\.apache\.commons\.collections\d?\.functors\.|\bcom\.sun\.org\.apache\.xalan|(?:^|[^a-z0-9+/])ro0ab"
          r"|\baced0005",
          description="Java classes that run code, and serialized Java objects (rO0AB, aced0005)"),
    # --- SQL injection ------------------------------------------------------------------------------
    _rule("sqli-union-select", "sqli", 1, 5, _INPUT,
          rf"\bunion{_SQL_SEP}+(?:all{_SQL_SEP}+|distinct{_SQL_SEP}+)?select{_SQL_SEP}+"
          r"(?:null\b|-?\d|@@|\*|'|\"|0x|[a-z_][\w.$]*\s*(?:\(|,|\bfrom\b)|(?:[a-z_][\w.$]*\s+){0,2}from\b)",
          ("sql",), "UNION SELECT with a column list"),
    _rule("sqli-quote-union", "sqli", 1, 5, _INPUT,
          rf"['\"`]\s*\)*{_SQL_SEP}*union{_SQL_SEP}+(?:all{_SQL_SEP}+|distinct{_SQL_SEP}+)?select\b",
          ("sql",), "a quote closed, then UNION SELECT"),
    _rule("sqli-tautology", "sqli", 1, 5, _INPUT,
          r"['\"`]\s*\)*\s*(?:or|and|xor|\|\||&&)\s*\(*\s*(?:'[^'\n]{0,20}'|\"[^\"\n]{0,20}\"|[\w.]+)\s*"
          r"(?:=|<=?|>=?|<>|!=|\blike\b|\bis\b|\bregexp\b|\bsounds\s+like\b)"
          r"|['\"`]\s*\)*\s*(?:or|and|\|\|)\s+(?:not\s+)?(?:true|false|null|\d+)\s*(?:--|#|/\*|;|$|\)|'|\")",
          ("sql",), "a quote closed, then an always-true (or false) condition: ' or '1'='1"),
    _rule("sqli-numeric-tautology", "sqli", 1, 5, _INPUT,
          r"(?:^|[\d)'\"])\s*(?:or|and|\|\||&&)\s+\(?\d+\)?\s*(?:=|<>|!=|<|>)\s*\(?\d+\)?\s*(?:--|#|/\*|;)",
          ("sql",), "a numeric always-true condition then a comment: 1 or 1=1--"),
    _rule("sqli-paren-tautology", "sqli", 1, 5, _INPUT,
          r"['\"`]?\s*\)+\s*(?:or|and|\|\||&&)\s+\(?\d+\)?\s*(?:=|<>|!=|<|>)\s*\(?\d+\b"
          r"|['\"`]\s*\)+\s*(?:or|and)\s+[a-z_][a-z0-9_]*\s*\(",
          ("sql",), "a parenthesis closed, then a condition: 1) and 12=12, ') or f("),
    _rule("sqli-string-comparison", "sqli", 1, 4, _INPUT,
          r"\b(?:and|or)\s+\(*\s*'[^'\n]{0,24}'\s*(?:=|like|<>|!=)\s*'",
          ("sql",), "a comparison of two quoted strings after AND/OR: and ('x' like 'x"),
    _rule("sqli-versioned-comment", "sqli", 1, 5, _INPUT,
          r"/\*!\d*\s*(?:union|select|and|or|from|where|insert|update|delete|drop|sleep|concat)\b",
          description="a MySQL versioned comment hiding a keyword: /*!50000union*/"),
    _rule("sqli-numeric-value-tautology", "sqli", 1, 5, _INPUT,
          r"(?:^|[/=])\s*-?\d+\s+(?:or|and|\|\||&&)\s+\d+\s*(?:=|<>|!=)\s*\d+\s*$",
          ("sql",), "a whole value that is a number and a numeric condition: 1234 or 1=1"),
    _rule("sqli-numeric-condition", "sqli", 1, 4, _INPUT,
          r"(?:^|[\d)])\s*(?:or|and|\|\||&&)\s+\(?\d+\)?\s*(?:=|<>|!=|<|>)\s*\(?\d+\)?\s*(?:$|\))",
          ("sql",), "a numeric condition after a number at the end of a value: 1 or 1=1"),
    _rule("sqli-stacked-query", "sqli", 1, 5, _INPUT,
          r";\s*(?:drop\s+(?:table|database|schema|user|view|index)|truncate\s+table|delete\s+from|insert\s+into"
          r"|update\s+[\w.`\"\[\]]+\s+set\b|create\s+(?:table|user|function|procedure)|alter\s+(?:table|user)"
          r"|exec(?:ute)?\s*(?:\(|xp_|sp_|master\.)|declare\s+@|shutdown\b|grant\s+\w+\s+on\b)",
          ("sql",), "a second statement after ';'"),
    _rule("sqli-time-delay", "sqli", 1, 5, _INPUT,
          r"\b(?:sleep|pg_sleep)\s*\(\s*\d+(?:\.\w+)?\s*\)|['\"`]\s*[+|&]+\s*(?:sleep|pg_sleep|benchmark)\s*\(|\bbenchmark\s*\(\s*\d+\s*,|\bwaitfor\s+(?:delay|time)\s+'"
          r"|\bdbms_(?:pipe\.receive_message|lock\.sleep)\s*\(|\brandomblob\s*\(\s*\d{6,}",
          ("sql",), "a time delay (blind injection)"),
    _rule("sqli-catalog-probe", "sqli", 1, 5, _INPUT,
          r"\binformation_schema\s*\.|\bsys\.(?:objects|tables|columns|databases|user\$)|\bpg_catalog\s*\.|\bpg_shadow\b"
          r"|\bmysql\.(?:user|db)\b|@@(?:version|datadir|hostname|basedir|servername)\b|\bsqlite_master\b"
          r"|\bsysobjects\b|\bsyscolumns\b|\ball_tables\b|\buser_tables\b",
          ("sql",), "the database's own catalog or version"),
    _rule("sqli-dangerous-function", "sqli", 1, 5, _INPUT,
          r"\bload_file\s*\(|\binto\s+(?:out|dump)file\b|\b(?:extractvalue|updatexml)\s*\(|\bxp_cmdshell\b"
          r"|\bsp_(?:executesql|oacreate|makewebtask)\b|\butl_(?:http|inaddr)\.|\bopenrowset\s*\("
          r"|\bcopy\s+\w+\s+(?:from|to)\s+program\b|\blo_import\s*\(|\bdbms_java\.",
          ("sql",), "a function that reads files, runs commands or leaks through errors"),
    _rule("sqli-comment-after-quote", "sqli", 1, 5, _INPUT,
          r"['\"`]\s*\)*\s*(?:--|#)[^\n]{0,3}$|['\"`]\s*;\s*(?:--|#|$)",
          ("sql",), "a quote closed then the rest of the value commented out: admin'--"),
    _rule("sqli-quote-keyword-comment", "sqli", 1, 5, _INPUT,
          r"['\"`]\s*\)*\s*(?:or|and|xor|collate|union|having|where|order|group|limit|not)\b[^\n]*(?:--|#)\s*-?\s*$",
          ("sql",), "a quote closed, an SQL keyword, and the rest commented out: z' or email notnull--"),
    _rule("sqli-quote-comment", "sqli", 1, 3, _INPUT, r"['\"`]\s*\)*\s*(?:--\s|/\*)",
          ("sql",), "a quote closed then a comment"),
    _rule("sqli-char-concat", "sqli", 1, 4, _INPUT,
          r"\bchar\s*\(\s*\d+(?:\s*,\s*\d+){2,}\s*\)|\bconcat(?:_ws)?\s*\([^)\n]{0,60}(?:0x[0-9a-f]{2,}|@@|char\s*\()"
          r"|\bchr\s*\(\s*\d+\s*\)\s*\|\|\s*chr\s*\(",
          ("sql",), "strings built from character codes"),
    _rule("sqli-order-by-probe", "sqli", 1, 5, _INPUT,
          r"\border\s+by\s+\d+\s*(?:--|#|/\*)|['\"`]\s*\)*\s*order\s+by\s+\d+"
          r"|\bgroup\s+by\b[^\n]{0,40}\bhaving\b[^\n]{0,20}(?:=|<|>)",
          ("sql",), "column counting with ORDER BY n"),
    _rule("sqli-select-from", "sqli", 2, 3, _INPUT,
          r"\bselect\s+(?:[\w*.,\s`\"()]{1,80})\s+from\s+[\w.`\"\[\]]+(?:\s+where\b|\s*(?:--|#|;|$))",
          ("sql",), "a SELECT ... FROM statement"),
    _rule("sqli-quote-keyword", "sqli", 2, 3, _INPUT,
          r"['\"`]\s*\)*\s*(?:union|select|insert|update|delete|drop|exec|having|order\s+by)\b",
          ("sql",), "a quote closed then an SQL keyword"),
    _rule("nosql-operator", "sqli", 1, 5, _INPUT,
          r"(?:^|\[)\$where(?:$|\])|\$where\s*[\"':]|\bthis\.\w+\s*(?:==|!=)|\bsleep\s*\(\s*\d{3,}\s*\)",
          description="a MongoDB $where or server-side JavaScript"),
    _rule("nosql-injection", "sqli", 1, 5, _INPUT,
          r"['\"]\s*,\s*\$(?:or|and|where|ne|gt|regex|nin)\s*:|\bdb\.\w+\.(?:insert|find|update|remove|drop|aggregate)"
          r"\s*\(|\bdo\s*\{[^}\n]*\}\s*while\s*\(",
          description="MongoDB operators or shell code injected into a query"),
    _rule("ldap-injection", "sqli", 1, 5, _INPUT,
          r"\(\s*[|&!]\s*\(\s*[\w.-]+\s*[~<>]?=|\*\s*\)\s*\(\s*[|&]|\bobjectclass\s*=\s*\*",
          description="an LDAP filter built to widen a search: *)(|(objectclass=*))"),
    _rule("nosql-query-operator", "sqli", 2, 3, _INPUT,
          r"(?:^|\[)\$(?:ne|gt|gte|lt|lte|nin|regex|exists|expr|function)(?:$|\])",
          description="a MongoDB query operator as a field name or parameter"),
    # --- Cross-site scripting -------------------------------------------------------------------------
    _rule("xss-script-tag", "xss", 1, 5, _INPUT, r"<\s*script\b|<\s*/\s*script\s*>",
          description="a <script> element"),
    _rule("xss-event-handler", "xss", 1, 5, _INPUT,
          r"<[a-z][a-z0-9:-]*(?:[\s/](?:[^>\n\"']|\"[^\"\n]*\"|'[^'\n]*')*?)?[\s/\"']on[a-z]{3,24}\s*=",
          description="an element with an on* event handler attribute"),
    _rule("xss-attribute-injection", "xss", 1, 5, _INPUT,
          r"[\"'\s/]on[a-z]{3,24}\s*=\s*[\"'`]?\s*(?:alert|prompt|confirm|eval|javascript:|fetch|document\.|window\."
          r"|top\.|self\.|this\.|location|import\s*\()",
          description="an on* handler that runs script, injected into an attribute: \" onmouseover=alert(1)"),
    _rule("xss-javascript-uri", "xss", 1, 5, _INPUT,
          r"(?:^|[\s\"'=(<`])(?:java|vb|live)script\s*:\s*(?://|[a-z_$][\w$.]*\s*[(`=\[]|\()"
          r"|\bdata\s*:\s*(?:text/html|image/svg\+xml|application/(?:x-)?javascript)\s*[;,]",
          description="a javascript: or an HTML data: URI"),
    _rule("xss-dangerous-element", "xss", 1, 3, _INPUT,
          r"<\s*(?:iframe|frame|frameset|object|embed|applet|svg|math|base|meta|link|style|form|isindex|xss)\b",
          description="an element that loads or runs content"),
    _rule("xss-js-sink", "xss", 1, 3, _INPUT,
          r"\b(?:document\s*\.\s*(?:cookie|domain|write)|window\s*\.\s*location|\.innerhtml\s*=|string\s*\.\s*"
          r"fromcharcode|\beval\s*\(|settimeout\s*\(\s*['\"`]|\batob\s*\(|\bfetch\s*\(\s*['\"`]https?:"
          r"|document\s*\[\s*['\"`](?:cookie|domain|write))",
          description="JavaScript that reads cookies, writes the page or evaluates text"),
    _rule("xss-eval-decoded", "xss", 1, 5, _INPUT,
          r"\b(?:eval|settimeout|setinterval|function)\s*\(\s*(?:atob|unescape|decodeuri(?:component)?|string\s*\.\s*"
          r"fromcharcode)\s*\(",
          description="script decoded at run time then evaluated: eval(atob(...))"),
    _rule("xss-alert-probe", "xss", 1, 3, _INPUT,
          r"\b(?:alert|prompt|confirm)\s*(?:\?\.\s*)?(?:\(\s*(?:\d+|document|window|self|top|'[^'\n]{0,20}'"
          r"|\"[^\"\n]{0,20}\"|`|\))|`)",
          description="alert(1) and friends, the usual XSS probe"),
    _rule("xss-template-injection", "xss", 1, 5, _INPUT,
          r"\{\{[^}\n]{0,80}(?:constructor|__proto__|\$on\.|\$eval|__class__|__globals__|__builtins__|__subclasses__"
          r"|config\.items|self\._)",
          description="client- or server-side template injection"),
    _rule("template-injection-probe", "xss", 1, 4, _INPUT,
          r"\{\{\s*\d+\s*[*+]\s*\d+\s*\}\}|[$#]\{\s*\d+\s*[*+]\s*\d+\s*\}|<%=\s*\d+\s*[*+]\s*\d+\s*%>",
          description="template arithmetic, the usual template-injection probe: {{7*7}}"),
    _rule("template-injection-exec", "xss", 1, 5, _INPUT,
          r"freemarker\.template\.utility\.execute|<#assign\b|\?new\s*\(\s*\)|\bt\s*\(\s*java\.lang\.runtime\)"
          r"|\{%\s*(?:import|include)\s+os\b|\{\{[^}\n]*\bos\.(?:system|popen)\b",
          description="a template directive that runs code"),
    _rule("xss-css-expression", "xss", 2, 3, _INPUT, r"\bexpression\s*\(|-moz-binding\s*:|@import\s+['\"]?javascript",
          description="CSS that runs script in old browsers"),
    # --- Path traversal ------------------------------------------------------------------------------
    _rule("traversal-dot-dot", "traversal", 1, 3, _FILES, r"(?:^|[\\/=])\.{2,}[\\/;]|[\\/]\.{2,}(?:$|[\\/;?#])",
          description="a ../ segment"),
    _rule("traversal-repeated", "traversal", 1, 5, _FILES, r"(?:\.{2,}[\\/;]+){2,}|(?:[\\/;]\.{2,}){2,}(?:$|[\\/])",
          description="../../ (two or more segments up)"),
    _rule("traversal-sensitive-file", "traversal", 1, 5, _FILES,
          r"(?:^|[\\/:=])(?:etc[\\/](?:passwd|shadow|group|hosts|issue|crontab|sudoers)\b|proc[\\/](?:self|\d+)[\\/]"
          r"(?:environ|cmdline|maps|fd|root|cwd|mem)|windows[\\/](?:win\.ini|system32[\\/])|boot\.ini\b"
          r"|var[\\/]run[\\/]secrets[\\/]|\.ssh[\\/](?:id_|authorized_keys)|\.aws[\\/]credentials)",
          description="a well-known sensitive file"),
    _rule("traversal-unc-path", "traversal", 1, 5, _FILES,
          r"(?:^|[=\s])\\\\[^\\\s]+\\[a-z]\$\\|\bntuser\.dat\b|\\windows\\system32\\",
          description="a UNC path to an administrative share or a Windows system file"),
    _rule("traversal-file-uri", "traversal", 1, 4, _FILES, r"\bfile:/{1,3}(?:[a-z]:|etc|proc|var|windows|users|home)\b",
          description="a file: URI to a system location"),
    _rule("traversal-null-byte", "traversal", 2, 3, _FILES, r"\x00|\.\w{1,5}%00",
          description="a NUL byte that cuts a file name"),
    _rule("filename-path", "traversal", 1, 5, frozenset({"filename"}), r"[\\/]|^\.\.?$|^[a-z]:",
          description="an uploaded file name with a directory in it"),
    # --- OS command injection ----------------------------------------------------------------------
    _rule("cmdi-chained-command", "cmdi", 1, 5, _INPUT,
          _CMD_START + r"(?:id|whoami|uname(?:\s+-\w+)?|ifconfig|ipconfig|hostname|pwd|printenv|env"
          r"|ls(?:\s+-\w+)?(?:\s+/[\w./-]*)?|sleep\s+\d+|ping\s+-[cn]\s*\d+(?:\s+\S+)?|nslookup\s+\S+|dig\s+\S+"
          r"|getent\s+\w+(?:\s+\S+)?|set\s+/a\s+[\d*+]+|dir(?:\s+[a-z]:\\\S*)?)\s*(?:$|[;&|`)#])",
          ("cmd",), "a bare command after a command separator: ; id"),
    _rule("cmdi-file-read", "cmdi", 1, 5, _INPUT,
          _CMD_START + r"(?:cat|head|tail|more|less|nl|tac|xxd|od|strings|type)\s+[^\n;|&]{0,40}"
          r"(?:/etc/|/proc/|\.\./|passwd|shadow|\.ssh|win\.ini|flag)",
          ("cmd",), "reading a system file after a command separator"),
    _rule("cmdi-download", "cmdi", 1, 5, _INPUT,
          r"(?:[;&|`\n(]|\$\()\s*(?:wget|curl|fetch|lwp-download|tftp|ftp)\s+(?:-\S+\s+)*(?:https?|ftp|tftp)://",
          ("cmd",), "a download tool fetching a URL"),
    _rule("cmdi-reverse-shell", "cmdi", 1, 5, _INPUT,
          r"\b(?:nc|ncat|netcat)\b[^\n;|&]{0,40}\s-[ec]\s|\bbash\s+-i\b|/dev/(?:tcp|udp)/|\bmkfifo\s+/tmp/"
          r"|\bsocat\b[^\n]{0,40}exec:|\bpowershell(?:\.exe)?\s+(?:-\w+\s+)*-(?:e|enc|encodedcommand|c|command)\b"
          r"|\bcmd(?:\.exe)?\s+/[ck]\s|\b(?:sh|bash|zsh|dash|ksh)\s+-c\s|\b(?:python[23]?|perl|ruby|php)\s+-[ecr]\s",
          ("cmd",), "a shell, interpreter or reverse-shell invocation"),
    _rule("cmdi-substitution", "cmdi", 1, 5, _INPUT,
          r"\$\(\s*(?:id|whoami|uname|cat|curl|wget|sleep|ls|nslookup|ping|echo|printf|bash|sh|base64|eval|rev|xxd|python\d?"
          r"|perl|nc|dig|host)\b|[;&|]\s*\$\("
          r"|`\s*(?:id|whoami|uname|cat|curl|wget|sleep|ls|nslookup|ping|bash|sh|echo|printf|dig)\b[^`\n]{0,60}`",
          ("cmd",), "command substitution: $(id), `id`"),
    _rule("code-injection", "cmdi", 1, 5, _INPUT,
          r"\$\{@?(?:print|system|exec|passthru|shell_exec|eval|assert|phpinfo)\s*\(|<\?php\b|\beval\s*\(\s*\$_(?:get|post|request)"
          r"|!!python/(?:object|name|module)|!!javax?\.|!ruby/object:|\b__import__\s*\(\s*['\"]os['\"]",
          description="code for an interpreter (PHP, YAML object tags, Python imports)"),
    _rule("powershell-command", "cmdi", 1, 5, _INPUT,
          r"\b(?:invoke-(?:webrequest|expression|restmethod|command|wmimethod)|downloadstring\s*\(|downloadfile\s*\("
          r"|new-object\s+(?:system\.)?net\.webclient|start-process\s|set-mppreference)\b|(?:^|[;&|`(])\s*(?:iex|iwr|iwmi)\s",
          description="PowerShell cmdlets that download or run code"),
    _rule("cmdi-ifs-evasion", "cmdi", 1, 4, _INPUT, r"\$\{?ifs\}?|\{(?:cat|ls|id|curl|wget),[^}\n]{1,40}\}",
          description="${IFS} and brace expansion, used to avoid spaces"),
    _rule("cmdi-shell-path", "cmdi", 2, 3, _INPUT, r"/bin/(?:ba|z|k|da)?sh\b|/usr/bin/(?:env|python\d?|perl|ruby)\b",
          description="a path to a shell or interpreter"),
    _rule("shellshock", "cmdi", 1, 5, _ALL, r"\(\s*\)\s*\{\s*[^}\n]{0,20};\s*\}\s*;",
          description="the Shellshock function definition () { :; };"),
    # --- SSRF by scheme (hosts are classified in code: ssrf.py) ----------------------------------------
    _rule("ssrf-scheme", "ssrf", 1, 5, frozenset({"path", "query", "cookie", "body"}),
          r"\b(?:gopher|dict|file|ldaps?|tftp|sftp|smb|rmi|jndi|iiop|corba|nfs|php|phar|expect|netdoc|glusterfs"
          r"|ssh2|zlib)://|\bjar:(?:file|https?|ftp):|\bfile:/",
          description="a URL scheme a server-side fetch should never follow (file:, gopher:, dict:, ...)"),
    # --- XML external entities -----------------------------------------------------------------
    _rule("xxe-entity", "xxe", 1, 5, _INPUT,
          r"<!doctype[^>\n]*(?:\[|\bsystem\b|\bpublic\b)|<!entity\s+%?\s*[\w.-]+\s+(?:system|public)\b",
          description="a DOCTYPE with an internal subset or external identifier, an external entity"),
    _rule("xxe-include", "xxe", 1, 4, _INPUT, r"<x[is]:include\b|\bxsi:(?:no)?(?:namespace)?schemalocation\s*=",
          description="XInclude or a schema location that makes the parser fetch"),
    # --- CRLF / header injection --------------------------------------------------------------------
    _rule("crlf-header-injection", "crlf", 1, 5, frozenset({"path", "query", "name", "cookie", "header"}),
          r"[\r\n]\s*(?:set-cookie|location|content-(?:type|length)|x-[a-z-]+|refresh|access-control-[a-z-]+)\s*:",
          description="a line break followed by a response header (response splitting)"),
)

#: Rule ids SSRF findings use (the SSRF detector classifies addresses in code, not by pattern).
SSRF_RULES = {
    "ssrf-metadata": (1, 5, "a cloud metadata endpoint"),
    "ssrf-loopback": (1, 5, "a loopback address or name (127.0.0.0/8, ::1, localhost)"),
    "ssrf-private": (1, 5, "a private, link-local, shared or reserved address"),
    "ssrf-obfuscated-ip": (1, 3, "an IPv4 address spelt in decimal, hex, octal or short form"),
    "ssrf-bare-internal-address": (2, 3, "a bare internal address as a whole value"),
}
#: Rule ids the inspector itself uses.
EVASION_RULE = ("evasion-encoding-flood", 1, 5, "more escapes than the decoder's budget: layered encoding")
