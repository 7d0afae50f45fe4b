//! The promise, checked on every CI run: a whole deploy pipeline's choreography under
//! sustained load (16 keep-alive clients) costs zero failed requests, and each phase's
//! traffic split is what the pipeline asked for. Real processes: one switchyard, and
//! stand-in app servers that are stopped, restarted and SIGKILLed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_deploy_under_load_fails_nothing_and_splits_as_asked() {
    let report = switchyard_standins::rehearsal::run(switchyard_standins::rehearsal::Options {
        binary: env!("CARGO_BIN_EXE_switchyard").into(),
        backends: 2,
        requests_per_phase: 3000,
    })
    .await
    .unwrap();
    println!("{}", report.table());
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    for phase in &report.phases {
        assert!(
            phase.split_ok(),
            "{}: green {:.2}% expected {}% ± {:.2}",
            phase.name,
            phase.green * 100.0,
            phase.expected_green,
            phase.tolerance
        );
    }
    assert!(report.requests > 15_000);
}
