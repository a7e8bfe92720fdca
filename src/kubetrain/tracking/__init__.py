"""Experiment tracking in MLflow: the optional extra, ``pip install 'kubetrain[tracking]'``.

With ``tracking.mlflow_uri`` set, the pipeline gets a ``track`` task after the accuracy gate
(locally under kfp.local and on a cluster alike). It logs the run from its artifacts, after the
fact: the effective config as params, every number of the evaluation as metrics, the training
history as per-epoch metrics (``step`` = epoch), each search trial as a nested run (its
parameters, objective and learning curve), and the report, the fp32 model and the int8 model as
artifacts. A promoted model becomes a new version of ``tracking.registered_model``.

Without the setting nothing changes: no task, no import of mlflow. Setting it without mlflow
installed is a config error (one line). MLflow's own telemetry and its "View run" lines on
stdout are switched off: nothing leaves the machine but the calls to the tracking server.

Modules: ``config`` (``TrackingConfig``, the section) and ``log`` (reading a run's artifacts and
logging them). Nothing is imported here, so that ``kubetrain.pipeline.config`` can compose the section
without importing what needs the config.
"""
