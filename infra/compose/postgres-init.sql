-- Runs once, when the PostgreSQL volume is first initialised: the database of MLflow's basic-auth
-- users and permissions (mlflow-auth.ini), next to the tracking database `mlflow`.
CREATE DATABASE mlflow_auth OWNER mlflow;
