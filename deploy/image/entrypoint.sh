#!/bin/sh
# The image's entry point: `eddy run STAGE` for eddy's stages. The Spark operator's driver and executor
# pods (args `driver ...`, `executor`) start Spark as Spark's own image would; Flink's native
# Kubernetes pods (kubernetes.entry.path = this script, args `bash -c ...`) run their command as is.
set -e
case "${1:-}" in
  driver)
    shift
    exec "$SPARK_HOME/bin/spark-submit" --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS:-}" --deploy-mode client "$@" ;;
  executor)
    exec java ${SPARK_EXECUTOR_JAVA_OPTS:-} -Xms"${SPARK_EXECUTOR_MEMORY:-1g}" -Xmx"${SPARK_EXECUTOR_MEMORY:-1g}" \
      -cp "$SPARK_HOME/jars/*:${SPARK_CLASSPATH:-}" org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "$SPARK_DRIVER_URL" --executor-id "$SPARK_EXECUTOR_ID" --cores "$SPARK_EXECUTOR_CORES" \
      --app-id "$SPARK_APPLICATION_ID" --hostname "$SPARK_EXECUTOR_POD_IP" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" --podName "${SPARK_EXECUTOR_POD_NAME:-}" ;;
  bash|sh|/*)
    exec "$@" ;;
  *)
    exec eddy run "$@" ;;
esac
