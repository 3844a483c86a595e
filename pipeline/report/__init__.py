"""The run report (``report.html``): ``samples`` (item orders, seeded samples and the statistics behind the
figures), ``figures`` (the PNGs), ``page`` (the HTML page and its headline) and ``build`` (``build_report``: which
figures a run gets, their captions, the summary and the run's tables)."""
