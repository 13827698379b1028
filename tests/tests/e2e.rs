//! End-to-end tests of `mirrord` and `mirrord-agent` against fake pods, as a user would use them:
//! start a pod, run `mirrord exec`/`env`/`shell` against it, look at what came back, and check
//! that nothing was left behind. Everything runs inside the isolated world (see
//! `mirrord_tests::world`); no test may reach the machine's own network.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use mirrord_tests::cluster::{HTTP_PORT, POD_FILE_DIR, POD_ONLY_FILE, POD_PATH};
use mirrord_tests::command::{Run, SHORT};
use mirrord_tests::world::{self, Entered};
use mirrord_tests::{Cluster, HandStartedAgent, Output, Pod, Pty, Scene, check_world};

/// Generous bound for one `mirrord` run; a hang fails the test instead of the whole suite.
const RUN: Duration = Duration::from_secs(30);

/// The pod's value of the variable most tests look at.
const POD_VALUE: &str = "from-the-pod";
/// Hostname of the standard pod, shaped like a deployment's pod name.
const POD_HOSTNAME: &str = "web-7d9f8-x2k4q";
/// A value needing quotes in every output format.
const QUOTED_VALUE: &str = "it's a \"pod\" value $HOME";
/// Set only in mirrord's own (local) environment.
const LOCAL_VALUE: &str = "from-the-laptop";

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

#[path = "e2e/dns.rs"]
mod dns;
#[path = "e2e/ergonomics.rs"]
mod ergonomics;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/files.rs"]
mod files;
#[path = "e2e/filters.rs"]
mod filters;
#[path = "e2e/image.rs"]
mod image;
#[path = "e2e/incoming.rs"]
mod incoming;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/network.rs"]
mod network;
#[path = "e2e/streams.rs"]
mod streams;

fn main() -> ExitCode {
    match world::enter() {
        Ok(Entered::Exited(code)) => return code,
        Ok(Entered::Inside) => {}
        Err(error) => {
            eprintln!("e2e: cannot enter the isolated world: {error}");
            return ExitCode::from(2);
        }
    }
    let conclusion = libtest_mimic::run(&Arguments::from_args(), tests());
    if let Err(error) = check_world() {
        eprintln!("e2e: after all tests: {error}");
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

fn tests() -> Vec<Trial> {
    type Test = fn(&Scene, &Cluster) -> Result<(), Failed>;
    let tests: [(&str, Test); 106] = [
        (
            "fixture_pod_is_a_separate_world",
            fixture_pod_is_a_separate_world,
        ),
        (
            "static_agent_answers_from_an_empty_root",
            image::static_agent_answers_from_an_empty_root,
        ),
        (
            "agent_image_says_when_it_cannot_build",
            image::agent_image_says_when_it_cannot_build,
        ),
        (
            "exec_sees_pod_env_and_keeps_local_env",
            exec_sees_pod_env_and_keeps_local_env,
        ),
        ("exec_has_pod_hostname", exec_has_pod_hostname),
        (
            "exec_has_own_network_with_the_pod_address",
            exec_has_own_network_with_the_pod_address,
        ),
        ("exec_propagates_exit_codes", exec_propagates_exit_codes),
        (
            "exec_include_keeps_only_matching_pod_vars",
            exec_include_keeps_only_matching_pod_vars,
        ),
        (
            "exec_exclude_drops_matching_pod_vars",
            exec_exclude_drops_matching_pod_vars,
        ),
        ("exec_env_override_wins", exec_env_override_wins),
        (
            "exec_config_file_and_flags_winning_over_it",
            exec_config_file_and_flags_winning_over_it,
        ),
        (
            "env_prints_pod_env_in_three_formats",
            env_prints_pod_env_in_three_formats,
        ),
        ("shell_through_a_pty", shell_through_a_pty),
        (
            "shell_ctrl_c_interrupts_foreground_job",
            shell_ctrl_c_interrupts_foreground_job,
        ),
        ("wrong_token_is_rejected", wrong_token_is_rejected),
        (
            "unreachable_agent_nothing_listening",
            unreachable_agent_nothing_listening,
        ),
        (
            "unreachable_agent_silent_listener",
            unreachable_agent_silent_listener,
        ),
        (
            "nonexistent_pid_is_a_clear_error",
            nonexistent_pid_is_a_clear_error,
        ),
        (
            "targetless_uses_the_local_context",
            targetless_uses_the_local_context,
        ),
        (
            "hand_started_agent_via_agent_addr",
            hand_started_agent_via_agent_addr,
        ),
        ("rootless_user_via_agent_addr", rootless_user_via_agent_addr),
        (
            "rootless_user_is_told_a_root_pod_needs_root",
            rootless_user_is_told_a_root_pod_needs_root,
        ),
        (
            "exec_ctrl_c_ends_command_and_session",
            lifecycle::exec_ctrl_c_ends_command_and_session,
        ),
        (
            "killing_mirrord_leaves_nothing",
            lifecycle::killing_mirrord_leaves_nothing,
        ),
        (
            "agent_death_mid_session_is_reported",
            lifecycle::agent_death_mid_session_is_reported,
        ),
        (
            "agent_serves_concurrent_sessions",
            lifecycle::agent_serves_concurrent_sessions,
        ),
        (
            "agent_survives_garbage_and_honours_idle_ttl",
            lifecycle::agent_survives_garbage_and_honours_idle_ttl,
        ),
        ("agent_reads_pod_files", lifecycle::agent_reads_pod_files),
        (
            "fault_agent_killed_mid_transfer",
            faults::fault_agent_killed_mid_transfer,
        ),
        (
            "fault_fuse_write_when_the_agent_dies",
            faults::fault_fuse_write_when_the_agent_dies,
        ),
        (
            "fault_link_cut_silently_is_noticed",
            faults::fault_link_cut_silently_is_noticed,
        ),
        (
            "fault_stalled_reader_leaves_other_streams_flowing",
            faults::fault_stalled_reader_leaves_other_streams_flowing,
        ),
        (
            "fault_ctrl_c_repeated_during_start_up",
            faults::fault_ctrl_c_repeated_during_start_up,
        ),
        (
            "fault_ctrl_c_repeated_during_heavy_traffic",
            faults::fault_ctrl_c_repeated_during_heavy_traffic,
        ),
        ("fs_ls_cat_find_grep", files::fs_ls_cat_find_grep),
        (
            "fs_tail_follows_pod_appends",
            files::fs_tail_follows_pod_appends,
        ),
        (
            "fs_git_in_a_pod_repository",
            files::fs_git_in_a_pod_repository,
        ),
        (
            "fs_sha256_of_a_256_mib_file",
            files::fs_sha256_of_a_256_mib_file,
        ),
        (
            "fs_write_mode_and_read_only_mode",
            files::fs_write_mode_and_read_only_mode,
        ),
        (
            "fs_escape_attempts_stay_in_the_pod",
            files::fs_escape_attempts_stay_in_the_pod,
        ),
        (
            "fs_symlink_swaps_during_reads_stay_in_the_pod",
            files::fs_symlink_swaps_during_reads_stay_in_the_pod,
        ),
        (
            "fs_proc_self_and_long_names",
            files::fs_proc_self_and_long_names,
        ),
        (
            "secrets_never_reach_the_logs",
            files::secrets_never_reach_the_logs,
        ),
        (
            "dns_answers_never_lead_to_this_machine",
            dns::dns_answers_never_lead_to_this_machine,
        ),
        (
            "dns_hostile_pod_server_gets_clean_answers",
            dns::dns_hostile_pod_server_gets_clean_answers,
        ),
        (
            "fs_overlays_follow_the_mode",
            files::fs_overlays_follow_the_mode,
        ),
        ("fs_extended_attributes", files::fs_extended_attributes),
        (
            "fs_extended_attributes_are_off_by_default",
            files::fs_extended_attributes_are_off_by_default,
        ),
        (
            "fs_small_files_read_with_their_directory_follow_the_pod",
            files::fs_small_files_read_with_their_directory_follow_the_pod,
        ),
        (
            "fs_service_account_without_a_local_path",
            files::fs_service_account_without_a_local_path,
        ),
        (
            "fs_nothing_mounted_after_kill_9",
            files::fs_nothing_mounted_after_kill_9,
        ),
        (
            "net_curl_and_static_wget_reach_a_cluster_only_server",
            network::net_curl_and_static_wget_reach_a_cluster_only_server,
        ),
        (
            "net_psql_queries_a_cluster_database",
            network::net_psql_queries_a_cluster_database,
        ),
        (
            "port_forward_psql_reaches_a_cluster_database",
            network::port_forward_psql_reaches_a_cluster_database,
        ),
        (
            "net_udp_echo_through_the_pod",
            network::net_udp_echo_through_the_pod,
        ),
        (
            "net_udp_from_6000_source_ports_leaves_room_for_connections",
            network::net_udp_from_6000_source_ports_leaves_room_for_connections,
        ),
        (
            "net_1000_connections_churn_for_30_s_without_growth",
            network::net_1000_connections_churn_for_30_s_without_growth,
        ),
        (
            "net_200_concurrent_connections_of_1_mib",
            network::net_200_concurrent_connections_of_1_mib,
        ),
        (
            "net_bulk_both_ways_with_and_without_tun_offload",
            network::net_bulk_both_ways_with_and_without_tun_offload,
        ),
        (
            "net_closed_port_is_refused_fast",
            network::net_closed_port_is_refused_fast,
        ),
        (
            "net_host_loopback_reaches_a_local_server",
            network::net_host_loopback_reaches_a_local_server,
        ),
        (
            "agent_streams_reach_the_cluster_through_the_pod",
            streams::agent_streams_reach_the_cluster_through_the_pod,
        ),
        (
            "fixture_cluster_dns_answers_the_pod",
            dns::fixture_cluster_dns_answers_the_pod,
        ),
        (
            "dns_resolv_conf_points_at_the_stub",
            dns::dns_resolv_conf_points_at_the_stub,
        ),
        (
            "dns_getent_nslookup_dig_see_cluster_records",
            dns::dns_getent_nslookup_dig_see_cluster_records,
        ),
        (
            "dns_curl_and_static_wget_by_service_name",
            dns::dns_curl_and_static_wget_by_service_name,
        ),
        (
            "dns_outgoing_filter_learns_addresses_from_dns",
            dns::dns_outgoing_filter_learns_addresses_from_dns,
        ),
        (
            "dns_big_answer_truncated_then_tcp",
            dns::dns_big_answer_truncated_then_tcp,
        ),
        ("dns_ttl_is_preserved", dns::dns_ttl_is_preserved),
        (
            "dns_cname_chain_and_raw_query_types",
            dns::dns_cname_chain_and_raw_query_types,
        ),
        ("dns_go_pure_resolver", dns::dns_go_pure_resolver),
        (
            "dns_unknown_name_is_nxdomain_at_once",
            dns::dns_unknown_name_is_nxdomain_at_once,
        ),
        (
            "dns_filter_local_and_remote_names",
            dns::dns_filter_local_and_remote_names,
        ),
        (
            "dns_shell_command_resolves_cluster_names",
            dns::dns_shell_command_resolves_cluster_names,
        ),
        (
            "dns_200_concurrent_lookups",
            dns::dns_200_concurrent_lookups,
        ),
        (
            "leftover_check_catches_a_stray_process",
            leftover_check_catches_a_stray_process,
        ),
        (
            "incoming_off_never_subscribes",
            incoming::incoming_off_never_subscribes,
        ),
        (
            "incoming_default_mirror_does_not_disturb_a_listening_command",
            incoming::incoming_default_mirror_does_not_disturb_a_listening_command,
        ),
        (
            "incoming_bad_filter_is_one_line_naming_the_key",
            incoming::incoming_bad_filter_is_one_line_naming_the_key,
        ),
        (
            "incoming_steal_answers_a_cluster_client_from_the_local_app",
            incoming::incoming_steal_answers_a_cluster_client_from_the_local_app,
        ),
        (
            "incoming_mirror_copies_while_the_pod_answers",
            incoming::incoming_mirror_copies_while_the_pod_answers,
        ),
        (
            "incoming_port_mapping_takes_the_remote_port_for_a_local_one",
            incoming::incoming_port_mapping_takes_the_remote_port_for_a_local_one,
        ),
        (
            "incoming_local_app_sees_the_clients_real_address",
            incoming::incoming_local_app_sees_the_clients_real_address,
        ),
        (
            "incoming_steal_over_ipv6_shows_the_clients_real_address",
            incoming::incoming_steal_over_ipv6_shows_the_clients_real_address,
        ),
        (
            "filter_header_routes_each_request_of_one_keep_alive_connection",
            filters::filter_header_routes_each_request_of_one_keep_alive_connection,
        ),
        (
            "filter_header_routes_grpc_calls_by_metadata",
            filters::filter_header_routes_grpc_calls_by_metadata,
        ),
        (
            "filter_header_routes_each_stream_of_one_h2c_connection_from_curl",
            filters::filter_header_routes_each_stream_of_one_h2c_connection_from_curl,
        ),
        (
            "filter_header_routes_a_websocket_upgrade",
            filters::filter_header_routes_a_websocket_upgrade,
        ),
        (
            "filter_all_of_path_and_method",
            filters::filter_all_of_path_and_method,
        ),
        (
            "connections_open_before_a_steal_stay_with_the_pod",
            filters::connections_open_before_a_steal_stay_with_the_pod,
        ),
        (
            "a_session_takes_a_mesh_sidecars_plain_connections_to_the_app",
            filters::a_session_takes_a_mesh_sidecars_plain_connections_to_the_app,
        ),
        (
            "a_second_agents_steal_of_a_stolen_port_needs_override",
            filters::a_second_agents_steal_of_a_stolen_port_needs_override,
        ),
        (
            "two_agents_with_their_own_filters_share_a_port",
            filters::two_agents_with_their_own_filters_share_a_port,
        ),
        (
            "filter_two_sessions_share_a_port",
            filters::filter_two_sessions_share_a_port,
        ),
        (
            "cleanup_when_the_command_exits",
            filters::cleanup_when_the_command_exits,
        ),
        ("cleanup_after_ctrl_c", filters::cleanup_after_ctrl_c),
        (
            "cleanup_after_kill_9_of_mirrord",
            filters::cleanup_after_kill_9_of_mirrord,
        ),
        (
            "cleanup_after_kill_9_of_the_agent",
            filters::cleanup_after_kill_9_of_the_agent,
        ),
        (
            "steal_without_nftables_is_one_line",
            filters::steal_without_nftables_is_one_line,
        ),
        (
            "completion_scripts_load_and_offer_a_pid_target",
            ergonomics::completion_scripts_load_and_offer_a_pid_target,
        ),
        (
            "verify_config_upstream_misspelt_and_broken_files",
            ergonomics::verify_config_upstream_misspelt_and_broken_files,
        ),
        ("version_and_man_pages", ergonomics::version_and_man_pages),
        (
            "install_script_into_a_temporary_prefix",
            ergonomics::install_script_into_a_temporary_prefix,
        ),
        (
            "exec_env_file_goes_over_the_pods_variables",
            ergonomics::exec_env_file_goes_over_the_pods_variables,
        ),
        ("quiet_and_no_color", ergonomics::quiet_and_no_color),
        (
            "ide_task_and_interpreter_wrapper",
            ergonomics::ide_task_and_interpreter_wrapper,
        ),
    ];
    tests
        .into_iter()
        .map(|(name, test)| Trial::test(name, move || scenario(name, test)))
        .collect()
}

/// Gives `body` a fresh scene and cluster, tears them down, then checks nothing was left behind
/// (also when the body failed, so a failure never leaks into other tests).
fn scenario(name: &str, body: fn(&Scene, &Cluster) -> Result<(), Failed>) -> Result<(), Failed> {
    let scene = Scene::new(name)?;
    let outcome = Cluster::new(&scene)
        .map_err(Failed::from)
        .and_then(|cluster| body(&scene, &cluster));
    let leftovers = scene.check_nothing_left();
    outcome?;
    leftovers?;
    Ok(())
}

/// The pod most tests use: a web pod with a few variables to filter.
fn standard_pod(cluster: &Cluster) -> Result<Pod<'_>, Failed> {
    Ok(Pod::builder("web-7d9f8-x2k4q")
        .hostname(POD_HOSTNAME)
        .env("POD_VAR", POD_VALUE)
        .env("KEEP_ME", "kept")
        .env("KEEP_TOO", "kept-too")
        .env("DROP_ME", "dropped")
        .env("POD_QUOTED", QUOTED_VALUE)
        .start(cluster)?)
}

/// Starts `cmd` (stdin empty, stdout piped) and reads its first line, for tests that act while
/// the command is still running; the child and the rest of its stdout are returned.
fn start_until_first_line(
    mut cmd: Command,
) -> Result<
    (
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
        String,
    ),
    Failed,
> {
    use std::io::BufRead;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    Ok((child, stdout, line))
}

/// `mirrord <args…>` as a user on the laptop runs it (with a local-only variable set).
fn mirrord(scene: &Scene, args: &[&str]) -> Result<Output, Failed> {
    let mut cmd = scene.mirrord()?;
    cmd.args(args).env("LOCAL_ONLY", LOCAL_VALUE);
    Ok(cmd.run(RUN)?)
}

/// `mirrord exec -t <pod> <flags…> -- <command…>`
fn exec(scene: &Scene, pod: &Pod, flags: &[&str], command: &[&str]) -> Result<Output, Failed> {
    let target = pod.target();
    let mut args = vec!["exec", "-t", &target];
    args.extend(flags);
    args.push("--");
    args.extend(command);
    mirrord(scene, &args)
}

/// `KEY=value` lines of `env` output.
fn env_map(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn ensure_success(out: &Output) -> Result<(), Failed> {
    ensure!(out.code == 0, "mirrord failed: {}", out.describe());
    Ok(())
}

/// mirrord's own failures: exit 125 and one `mirrord: ` line mentioning one of `needles`.
fn ensure_mirrord_error(out: &Output, needles: &[&str]) -> Result<(), Failed> {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(out.code == 125, "expected exit 125: {}", out.describe());
    ensure!(
        lines.len() == 1 && lines[0].starts_with("mirrord: "),
        "expected exactly one `mirrord: ` line on stderr: {}",
        out.describe()
    );
    ensure!(
        needles.iter().any(|n| lines[0].contains(n)),
        "expected stderr to mention one of {needles:?}: {}",
        out.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fixture itself (needs no mirrord binary).

fn fixture_pod_is_a_separate_world(_scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = Pod::builder("fixture-pod")
        .hostname("fixture-host")
        .env("POD_VAR", POD_VALUE)
        .file("extra.txt", "extra\n")
        .start(cluster)?;
    let http = cluster.serve_http(&[("hello.txt", "hello from the cluster\n")])?;

    let hostname = pod.command("hostname").run(SHORT)?;
    ensure!(
        hostname.stdout.trim() == "fixture-host",
        "pod hostname: {}",
        hostname.describe()
    );

    let environ = std::fs::read(format!("/proc/{}/environ", pod.pid()))?;
    let mut environ: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    environ.sort();
    let expected = [
        format!("PATH={POD_PATH}"),
        "POD_NAME=fixture-pod".to_owned(),
        format!("POD_VAR={POD_VALUE}"),
    ];
    ensure!(
        environ == expected,
        "pod environ {environ:?}, expected {expected:?}"
    );

    let only = format!("{POD_FILE_DIR}/{POD_ONLY_FILE}");
    let seen = pod
        .command("cat")
        .args([&only, &format!("{POD_FILE_DIR}/extra.txt")])
        .run(SHORT)?;
    ensure!(
        seen.stdout == format!("{}extra\n", pod.pod_only_content()),
        "pod files: {}",
        seen.describe()
    );
    ensure!(
        !std::path::Path::new(&only).exists(),
        "{only} is visible outside the pod"
    );

    let links = pod
        .command("ip")
        .args(["-o", "-4", "addr", "show", "eth0"])
        .run(SHORT)?;
    ensure!(
        links.stdout.contains(&format!("{}/30", pod.ip())),
        "pod address: {}",
        links.describe()
    );

    let curl = |cmd: &mut Command| {
        cmd.args(["-sS", "--max-time", "5", &http.url("hello.txt")])
            .run(SHORT)
    };
    let from_pod = curl(&mut pod.command("curl"))?;
    ensure!(
        from_pod.code == 0 && from_pod.stdout == "hello from the cluster\n",
        "pod cannot reach the cluster server on port {HTTP_PORT}: {}",
        from_pod.describe()
    );
    // From the world (only `lo`) the cluster address has no route: this fails immediately.
    let from_world = curl(&mut Command::new("curl"))?;
    ensure!(
        from_world.code != 0,
        "the world reached the cluster: {}",
        from_world.describe()
    );
    Ok(())
}

/// The leftover check is only worth something if it notices: start a tagged process, "forget" it.
fn leftover_check_catches_a_stray_process(
    _scene: &Scene,
    _cluster: &Cluster,
) -> Result<(), Failed> {
    let clean = Scene::new("clean-probe")?;
    let clean_result = clean.check_nothing_left();
    ensure!(
        clean_result.is_ok(),
        "an untouched scene reported leftovers: {clean_result:?}"
    );

    let probe = Scene::new("stray-probe")?;
    let mut stray = probe.command("sleep").arg("60").spawn()?;
    let found = probe.check_nothing_left();
    // The check killed it; reap it so it does not linger as a zombie.
    let _ = stray.wait();
    ensure!(found.is_err(), "a stray tagged process went unnoticed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mirrord exec

fn exec_sees_pod_env_and_keeps_local_env(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = exec(scene, &pod, &[], &["printenv", "POD_VAR"])?;
    ensure_success(&out)?;
    ensure!(
        out.stdout == format!("{POD_VALUE}\n"),
        "POD_VAR: {}",
        out.describe()
    );

    let out = exec(scene, &pod, &[], &["env"])?;
    ensure_success(&out)?;
    let env = env_map(&out.stdout);
    ensure!(
        env.get("LOCAL_ONLY").map(String::as_str) == Some(LOCAL_VALUE),
        "local var lost: {}",
        out.describe()
    );
    let local_path = std::env::var("PATH").unwrap_or_default();
    ensure!(
        env.get("PATH") == Some(&local_path),
        "PATH must stay the local one ({local_path}), not the pod's: {}",
        out.describe()
    );
    ensure!(
        env.get("POD_NAME").map(String::as_str) == Some("web-7d9f8-x2k4q"),
        "POD_NAME: {}",
        out.describe()
    );
    Ok(())
}

fn exec_has_pod_hostname(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = exec(scene, &pod, &[], &["hostname"])?;
    ensure_success(&out)?;
    ensure!(
        out.stdout.trim() == POD_HOSTNAME,
        "hostname: {}",
        out.describe()
    );
    Ok(())
}

/// The command has a network namespace of its own: `lo` and the tunnel, which carries the
/// pod's address.
fn exec_has_own_network_with_the_pod_address(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = exec(
        scene,
        &pod,
        &[],
        &["ip", "-o", "-4", "addr", "show", "mirrord0"],
    )?;
    ensure!(
        out.code == 0 && out.stdout.contains(&format!(" inet {}/32 ", pod.ip())),
        "the tunnel does not carry the pod's address {}: {}",
        pod.ip(),
        out.describe()
    );
    let out = exec(scene, &pod, &[], &["ip", "-o", "link"])?;
    ensure_success(&out)?;
    let names: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .map(str::trim)
        .collect();
    ensure!(
        names == ["lo", "mirrord0"],
        "interfaces inside mirrord: {names:?}: {}",
        out.describe()
    );
    Ok(())
}

fn exec_propagates_exit_codes(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let cases: [(&[&str], i32); 5] = [
        (&["sh", "-c", "exit 0"], 0),
        (&["sh", "-c", "exit 3"], 3),
        (&["sh", "-c", "kill -TERM $$"], 143),
        (&["sh", "-c", "kill -KILL $$"], 137),
        (&["mrdt-no-such-command"], 127),
    ];
    for (command, expected) in cases {
        let out = exec(scene, &pod, &[], command)?;
        ensure!(
            out.code == expected,
            "{command:?}: expected exit {expected}: {}",
            out.describe()
        );
    }
    Ok(())
}

fn exec_include_keeps_only_matching_pod_vars(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = exec(scene, &pod, &["-s", "KEEP_*;POD_VAR"], &["env"])?;
    ensure_success(&out)?;
    let env = env_map(&out.stdout);
    for (key, value) in [
        ("KEEP_ME", "kept"),
        ("KEEP_TOO", "kept-too"),
        ("POD_VAR", POD_VALUE),
    ] {
        ensure!(
            env.get(key).map(String::as_str) == Some(value),
            "{key} missing: {}",
            out.describe()
        );
    }
    for key in ["DROP_ME", "POD_QUOTED", "POD_NAME"] {
        ensure!(
            !env.contains_key(key),
            "{key} should not be included: {}",
            out.describe()
        );
    }
    ensure!(
        env.contains_key("LOCAL_ONLY"),
        "include must not drop local vars: {}",
        out.describe()
    );
    Ok(())
}

fn exec_exclude_drops_matching_pod_vars(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = exec(scene, &pod, &["-x", "DROP_*;POD_QUOTED"], &["env"])?;
    ensure_success(&out)?;
    let env = env_map(&out.stdout);
    for key in ["DROP_ME", "POD_QUOTED"] {
        ensure!(
            !env.contains_key(key),
            "{key} should be excluded: {}",
            out.describe()
        );
    }
    for key in ["KEEP_ME", "POD_VAR", "POD_NAME", "LOCAL_ONLY"] {
        ensure!(env.contains_key(key), "{key} missing: {}", out.describe());
    }
    Ok(())
}

fn exec_env_override_wins(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let flags = ["--env", "POD_VAR=mine", "--env", "NEW_VAR=added"];
    let out = exec(
        scene,
        &pod,
        &flags,
        &["sh", "-c", "printf '%s %s\\n' \"$POD_VAR\" \"$NEW_VAR\""],
    )?;
    ensure_success(&out)?;
    ensure!(
        out.stdout == "mine added\n",
        "overrides: {}",
        out.describe()
    );
    Ok(())
}

fn exec_config_file_and_flags_winning_over_it(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let config = scene.temp_dir().join("mirrord.json");
    let json = serde_json::json!({
        "target": pod.target(),
        "feature": {"env": {"include": "KEEP_*;POD_VAR", "exclude": "KEEP_TOO", "override": {"POD_VAR": "from-file"}}}
    });
    std::fs::write(&config, json.to_string())?;
    let config = config.to_string_lossy().into_owned();

    // The target comes from the file too: no -t.
    let out = mirrord(scene, &["exec", "-f", &config, "--", "env"])?;
    ensure_success(&out)?;
    let env = env_map(&out.stdout);
    ensure!(
        env.get("POD_VAR").map(String::as_str) == Some("from-file"),
        "file override: {}",
        out.describe()
    );
    ensure!(
        env.get("KEEP_ME").map(String::as_str) == Some("kept"),
        "file include: {}",
        out.describe()
    );
    ensure!(
        !env.contains_key("KEEP_TOO"),
        "file exclude: {}",
        out.describe()
    );
    ensure!(
        !env.contains_key("DROP_ME"),
        "file include must drop DROP_ME: {}",
        out.describe()
    );

    let flags = [
        "exec",
        "-f",
        &config,
        "-s",
        "DROP_*",
        "-x",
        "NOTHING",
        "--env",
        "POD_VAR=from-flag",
        "--",
        "env",
    ];
    let out = mirrord(scene, &flags)?;
    ensure_success(&out)?;
    let env = env_map(&out.stdout);
    ensure!(
        env.get("POD_VAR").map(String::as_str) == Some("from-flag"),
        "flag override must win: {}",
        out.describe()
    );
    ensure!(
        env.get("DROP_ME").map(String::as_str) == Some("dropped"),
        "flag include must win: {}",
        out.describe()
    );
    ensure!(
        !env.contains_key("KEEP_ME"),
        "flag include replaces the file's: {}",
        out.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mirrord env

fn env_prints_pod_env_in_three_formats(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let target = pod.target();

    let sh = mirrord(scene, &["env", "-t", &target, "--format", "sh"])?;
    ensure_success(&sh)?;
    ensure!(
        sh.stdout.contains(&format!("export POD_VAR='{POD_VALUE}'")),
        "sh format: {}",
        sh.describe()
    );
    ensure!(
        !sh.stdout.contains("LOCAL_ONLY"),
        "local vars are not the pod's: {}",
        sh.describe()
    );
    // What a user does with it: eval it in a shell and get the exact value back.
    let script = format!("{}\nprintf '%s' \"$POD_QUOTED\"", sh.stdout);
    let evaluated = Command::new("sh").args(["-c", &script]).run(SHORT)?;
    ensure!(
        evaluated.stdout == QUOTED_VALUE,
        "sh quoting: {} from {}",
        evaluated.describe(),
        sh.stdout
    );

    let dotenv = mirrord(scene, &["env", "-t", &target, "--format", "dotenv"])?;
    ensure_success(&dotenv)?;
    let lines: Vec<&str> = dotenv.stdout.lines().collect();
    ensure!(
        lines.contains(&format!("POD_VAR={POD_VALUE}").as_str()),
        "dotenv format: {}",
        dotenv.describe()
    );
    ensure!(
        lines.iter().any(|l| l.starts_with("POD_QUOTED=")),
        "dotenv quoted value: {}",
        dotenv.describe()
    );
    ensure!(
        !dotenv.stdout.contains("LOCAL_ONLY"),
        "local vars are not the pod's: {}",
        dotenv.describe()
    );

    let json = mirrord(
        scene,
        &[
            "env",
            "-t",
            &target,
            "--format",
            "json",
            "-x",
            "DROP_*",
            "--env",
            "EXTRA=by-flag",
        ],
    )?;
    ensure_success(&json)?;
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout)?;
    let value = |key: &str| {
        parsed
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    ensure!(
        value("POD_VAR").as_deref() == Some(POD_VALUE),
        "json POD_VAR: {}",
        json.describe()
    );
    ensure!(
        value("POD_QUOTED").as_deref() == Some(QUOTED_VALUE),
        "json POD_QUOTED: {}",
        json.describe()
    );
    ensure!(
        value("EXTRA").as_deref() == Some("by-flag"),
        "json override: {}",
        json.describe()
    );
    ensure!(
        value("DROP_ME").is_none(),
        "json exclude: {}",
        json.describe()
    );
    ensure!(
        value("LOCAL_ONLY").is_none(),
        "local vars are not the pod's: {}",
        json.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mirrord shell

/// `mirrord shell -t <pod>` with bash on a real terminal; HOME is an empty directory so no rc
/// file of this machine changes the prompt.
fn bash_on_pty(scene: &Scene, pod: &Pod) -> Result<Pty, Failed> {
    let mut cmd = scene.mirrord()?;
    cmd.args(["shell", "-t", &pod.target()])
        .env("SHELL", "/bin/bash")
        .env("HOME", scene.temp_dir())
        .env("TERM", "dumb");
    Ok(Pty::spawn(cmd)?)
}

fn shell_through_a_pty(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut pty = bash_on_pty(scene, &pod)?;
    pty.expect(&format!("(mirrord:{}) ", pod.target()), RUN)?;
    // The typed line is echoed with `$…` unexpanded, so only the command's output can match.
    pty.send(b"echo \"var=$POD_VAR\"\n")?;
    pty.expect(&format!("var={POD_VALUE}"), SHORT)?;
    pty.send(b"echo \"host=$(hostname)\"\n")?;
    pty.expect(&format!("host={POD_HOSTNAME}"), SHORT)?;
    pty.send(b"echo \"target=$MIRRORD_TARGET\"\n")?;
    pty.expect(&format!("target={}", pod.target()), SHORT)?;
    pty.send(b"exit 7\n")?;
    let code = pty.wait(SHORT)?;
    ensure!(
        code == 7,
        "mirrord shell exited {code}, expected 7; terminal: {}",
        pty.transcript()
    );
    Ok(())
}

fn shell_ctrl_c_interrupts_foreground_job(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut pty = bash_on_pty(scene, &pod)?;
    pty.expect("(mirrord:pid/", RUN)?;
    pty.send(b"sleep 30; echo slept-$((6*7))\n")?;
    // Let bash start the job, so the Ctrl-C hits `sleep` rather than the line editor.
    thread::sleep(Duration::from_millis(700));
    let interrupted_at = Instant::now();
    pty.send(b"\x03")?;
    pty.expect("(mirrord:pid/", SHORT)?;
    pty.send(b"echo alive-$((20+3))\n")?;
    pty.expect("alive-23", SHORT)?;
    ensure!(
        interrupted_at.elapsed() < Duration::from_secs(10),
        "Ctrl-C did not interrupt sleep promptly"
    );
    ensure!(
        !pty.transcript().contains("slept-42"),
        "sleep ran to completion: {}",
        pty.transcript()
    );
    pty.send(b"exit\n")?;
    let code = pty.wait(SHORT)?;
    ensure!(
        code == 0,
        "mirrord shell exited {code}; terminal: {}",
        pty.transcript()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Agents started by hand, and failures a user must understand

fn start_agent(scene: &Scene, pod: &Pod, token: &str) -> Result<HandStartedAgent, Failed> {
    let mut cmd = scene.agent()?;
    cmd.args(["--target-pid", &pod.pid().to_string()])
        .env("MIRRORD_AGENT_TOKEN", token);
    Ok(HandStartedAgent::start(cmd, SHORT)?)
}

fn wrong_token_is_rejected(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let agent = start_agent(scene, &pod, "the-right-token")?;
    let addr = agent.addr().to_string();
    let out = mirrord(
        scene,
        &[
            "exec",
            "--agent-addr",
            &addr,
            "--agent-token",
            "a-wrong-token",
            "--",
            "true",
        ],
    )?;
    ensure_mirrord_error(&out, &["rejected the session token"])
}

const UNREACHABLE: [&str; 2] = ["cannot reach the agent", "did not answer"];

fn unreachable_agent_nothing_listening(scene: &Scene, _cluster: &Cluster) -> Result<(), Failed> {
    // A port that was just free on the world's loopback: nothing listens there any more.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let out = mirrord(
        scene,
        &[
            "exec",
            "--agent-addr",
            &addr,
            "--agent-token",
            "t",
            "--",
            "true",
        ],
    )?;
    ensure_mirrord_error(&out, &UNREACHABLE)?;
    ensure!(
        out.elapsed < Duration::from_secs(5),
        "took {:?}, must be < 5 s",
        out.elapsed
    );
    Ok(())
}

fn unreachable_agent_silent_listener(scene: &Scene, _cluster: &Cluster) -> Result<(), Failed> {
    // The kernel completes the handshake into the backlog; nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let addr = silent.local_addr()?.to_string();
    let out = mirrord(
        scene,
        &[
            "exec",
            "--agent-addr",
            &addr,
            "--agent-token",
            "t",
            "--",
            "true",
        ],
    )?;
    drop(silent);
    ensure_mirrord_error(&out, &UNREACHABLE)?;
    ensure!(
        out.elapsed < Duration::from_secs(5),
        "took {:?}, must be < 5 s",
        out.elapsed
    );
    Ok(())
}

fn nonexistent_pid_is_a_clear_error(scene: &Scene, _cluster: &Cluster) -> Result<(), Failed> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()?;
    // The kernel hands out pids below pid_max only, so this one never exists (a free pid
    // found by looking could be taken by the time the agent looks).
    let pid = pid_max;
    let out = mirrord(scene, &["exec", "-t", &format!("pid/{pid}"), "--", "true"])?;
    ensure_mirrord_error(&out, &["no process with pid"])
}

fn hand_started_agent_via_agent_addr(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    // The agent reads its token from a file, mirrord from the environment.
    let token_file = scene.temp_dir().join("agent-token");
    std::fs::write(&token_file, "hand-token\n")?;
    // It listens on a Unix socket file; one left by a killed agent is replaced.
    let socket = scene.temp_dir().join("agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    let listen = format!("unix:{}", socket.display());
    let agent_cmd = || -> Result<_, Failed> {
        let mut cmd = scene.agent()?;
        cmd.args(["--target-pid", &pod.pid().to_string(), "--token-file"])
            .arg(&token_file)
            .args(["--listen", &listen]);
        Ok(cmd)
    };
    let agent = HandStartedAgent::start(agent_cmd()?, SHORT)?;
    ensure!(
        agent.addr() == listen,
        "the agent listens on {}",
        agent.addr()
    );

    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "--agent-addr", agent.addr(), "--"])
        .args(["sh", "-c", "hostname; printenv POD_VAR"])
        .env("MIRRORD_AGENT_TOKEN", "hand-token");
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0 && out.stdout == format!("{POD_HOSTNAME}\n{POD_VALUE}\n"),
        "via --agent-addr: {}\nagent stderr: {}",
        out.describe(),
        agent.stderr()
    );

    // A second agent on the live socket refuses in one line instead of stealing it.
    let out = agent_cmd()?.run(SHORT)?;
    ensure!(
        out.code == 1
            && out.stderr.trim_end().lines().count() == 1
            && out.stderr.contains(&format!("cannot listen on {listen}"))
            && out.stderr.contains("in use"),
        "a second agent on {listen}: {}",
        out.describe()
    );
    Ok(())
}

/// An unprivileged user cannot join a root-owned pod's namespaces; mirrord says so in one line.
fn rootless_user_is_told_a_root_pod_needs_root(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let (mut cmd, _) = mirrord_as_rootless_user(scene)?;
    cmd.args(["exec", "-t", &pod.target(), "--", "true"]);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 125
            && out.stderr.lines().count() == 1
            && out.stderr.starts_with("mirrord: ")
            && out.stderr.contains("needs root"),
        "as {ROOTLESS_USER} against a root pod: {}",
        out.describe()
    );
    Ok(())
}

/// `-t targetless`: the agent serves its own context, so the command sees this machine's
/// hostname and environment, still in namespaces of its own.
fn targetless_uses_the_local_context(scene: &Scene, _cluster: &Cluster) -> Result<(), Failed> {
    let own_hostname = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    let out = mirrord(
        scene,
        &[
            "exec",
            "-t",
            "targetless",
            "--",
            "sh",
            "-c",
            "hostname; printenv LOCAL_ONLY MIRRORD_TARGET; ip -o link | wc -l",
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{own_hostname}\n{LOCAL_VALUE}\ntargetless\n2\n"),
        "targetless: {}",
        out.describe()
    );
    Ok(())
}

const ROOTLESS_USER: &str = "mrdt-user";

/// `mirrord`, run as the unprivileged test user (with its own HOME, USER and LOGNAME), and
/// that user's uid; the caller adds mirrord's arguments.
fn mirrord_as_rootless_user(scene: &Scene) -> Result<(Command, u32), Failed> {
    let (uid, gid) = rootless_user()?;
    let mut cmd = scene.command("setpriv");
    cmd.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &gid.to_string(),
        "--init-groups",
        "--",
    ])
    .arg(mirrord_tests::mirrord_binary()?)
    .env("HOME", scene.temp_dir())
    .env("USER", ROOTLESS_USER)
    .env("LOGNAME", ROOTLESS_USER);
    Ok((cmd, uid))
}

/// The unprivileged user of the rootless test, created once per machine.
fn rootless_user() -> Result<(u32, u32), Failed> {
    let id = |flag: &str| -> Result<Option<u32>, Failed> {
        let out = Command::new("id").args([flag, ROOTLESS_USER]).run(SHORT)?;
        Ok(if out.code == 0 {
            out.stdout.trim().parse().ok()
        } else {
            None
        })
    };
    if id("-u")?.is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(ROOTLESS_USER)
            .run(SHORT)?;
        // Exit 9: created concurrently by someone else, which is just as good.
        ensure!(
            out.code == 0 || out.code == 9,
            "useradd: {}",
            out.describe()
        );
    }
    match (id("-u")?, id("-g")?) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(Failed::from(format!("user {ROOTLESS_USER} has no uid/gid"))),
    }
}

fn rootless_user_via_agent_addr(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    // Joining a root-owned pod needs root: root starts the agent, the user only connects to it.
    let agent = start_agent(scene, &pod, "rootless-token")?;
    let (mut cmd, uid) = mirrord_as_rootless_user(scene)?;
    cmd.args([
        "exec",
        "--agent-addr",
        agent.addr(),
        "--agent-token",
        "rootless-token",
        "--",
    ])
    .args(["sh", "-c", "id -u; hostname; printenv POD_VAR"]);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0 && out.stdout == format!("{uid}\n{POD_HOSTNAME}\n{POD_VALUE}\n"),
        "as {ROOTLESS_USER} (uid {uid}): {}\nagent stderr: {}",
        out.describe(),
        agent.stderr()
    );
    Ok(())
}
