-- The compose stack's PostgreSQL holds two databases: `mlflow` (created from POSTGRES_DB) and
-- `optuna` (the tuning studies), owned by the same role.
CREATE DATABASE optuna;
