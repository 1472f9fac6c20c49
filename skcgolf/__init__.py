"""skc-golf's shared helpers: log parsing (runlog), starting runs from env files (trainrun), tiny generated data
(tinydata). Imported by scripts/, bench/, tests/ and build_submission.py from the repository root."""
