"""tunnelwatch's analysis: pure functions over DataFrames of stored measurements."""
