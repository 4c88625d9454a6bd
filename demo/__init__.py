"""Running keyart on one machine: the closed-loop demo, its report, and the project-local Airflow."""
