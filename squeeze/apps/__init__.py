"""The tools built on the library: the ``squeeze`` command (:mod:`.cli`), the demo (:mod:`.demo`),
the needle task (:mod:`.needle`) and the accuracy evaluations (:mod:`.eval`).

They use the library's public API the way a user would; the library (``squeeze`` outside this
folder) never imports them.
"""
