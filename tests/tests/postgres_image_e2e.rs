//! End-to-end: the "Self-hosted Kubernetes cluster" health-check example
//! (`tests/pipelines/k8s-health-checks.yaml`) run by the built `stagehand` with container
//! steps: two `postgres` Background services on EmptyDir PGDATA volumes, each checked by a
//! `postgres:9-alpine` Run step over `localhost`, then a step that writes to and reads from
//! both databases.
//!
//! Owns: that proof, and reporting how long the image build (when this run did it), the
//! imports and the pipeline took. Does not own: building and importing the image or the
//! leftovers check (`stagehand_e2e::pgimage`), starting stagehand and markers
//! (`stagehand_e2e::e2e`).
//!
//! Needs root, runc, network access to the Debian mirror apt uses for the first build (about
//! a minute; cached in /var/cache/stagehand-tests afterwards), and `cargo build -p stagehand`
//! beforehand.

use std::time::Duration;

use stagehand_e2e::e2e::{Workspace, pipeline};
use stagehand_e2e::pgimage::{PgStore, assert_container_run_gone, cached_rootfs};
use stagehand_e2e::sandbox::{self, require_root};

/// The pipeline, from starting stagehand to its exit. Two initdbs and two servers on two
/// cores take a few seconds; the bound is for a loaded machine, far below what a fixed
/// `sleep 15` per health check would need plus a stuck service.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(50);

#[test]
fn kubernetes_health_check_example_runs_with_postgres_containers() {
    require_root();
    let image = cached_rootfs();
    match image.built_in {
        Some(t) => eprintln!("postgres rootfs: built in {:.1} s", t.as_secs_f64()),
        None => eprintln!("postgres rootfs: cached at {}", image.tar.display()),
    }
    let ws = Workspace::new();
    let store = PgStore::import(&image.tar, ws.marker());
    eprintln!(
        "imported as postgres and postgres:9-alpine in {:.1} s",
        store.imported_in.as_secs_f64()
    );

    let cmd = ws
        .stagehand_run(&pipeline("k8s-health-checks.yaml"))
        .arg("--root")
        .arg(store.root());
    let out = sandbox::spawn(cmd).wait(PIPELINE_TIMEOUT);
    eprintln!("pipeline ran in {:.1} s", out.elapsed.as_secs_f64());

    out.assert_code(0);
    // Steps inside a step group are reported as `<group>_<step>`.
    for (id, result) in [
        ("sg1_Background_1", "started"),
        ("sg2_Background_2", "started"),
        ("sg1_Run_1", "passed"),
        ("sg2_Run_2", "passed"),
        ("Run_3", "passed"),
    ] {
        let row = out.summary_row(id);
        assert!(
            row.ends_with(result),
            "step {id} did not succeed: {row}\n{}",
            out.dump()
        );
    }
    // The servers really came from the entrypoint: initdb in PGDATA, the EmptyDir volume.
    for (id, pgdata) in [
        ("sg1_Background_1", "/tmp/pgdata1"),
        ("sg2_Background_2", "/tmp/pgdata2"),
    ] {
        let log = out.log(id);
        assert!(
            log.contains(&format!("initdb in {pgdata}"))
                && log.contains("PostgreSQL init process complete"),
            "{id} did not initialise {pgdata}:\n{log}"
        );
    }
    // SIGTERM reached the postmaster through the container's init (a smart shutdown).
    for id in ["sg1_Background_1", "sg2_Background_2"] {
        out.assert_stdout_has(&format!("service {id} stopped: exit code 0"));
    }
    let rows = out.step_output("Run_3");
    for want in ["row: test1=hello from test1", "row: test2=hello from test2"] {
        assert!(
            rows.iter().any(|l| l == want),
            "Run_3 did not print {want:?}: {rows:?}\n{}",
            out.dump()
        );
    }

    let checks = std::time::Instant::now();
    assert_container_run_gone(&out, ws.marker(), &store.root());
    eprintln!(
        "leftover checks took {:.1} s",
        checks.elapsed().as_secs_f64()
    );
}
