"""scikit-learn style estimators over recorded trajectories."""
