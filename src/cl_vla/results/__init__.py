"""What a run and a sweep leave on disk: one run's files (:mod:`.run_files`: results.json, R as CSV
and PNG, the terminal summary), a sweep's report (:mod:`.sweep_report`), and the plots and tables both
share (:mod:`.plots`, :mod:`.tables`)."""
