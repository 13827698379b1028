//! `mirrord`: parses arguments, runs the command, and exits with the launched command's status
//! (or 125 with one line on stderr when mirrord itself fails).

use clap::FromArgMatches;
use mirrord_cli::args::{Cli, Command};
use mirrord_cli::exit::EXIT_MIRRORD_FAILED;
use mirrord_cli::{completion, logging, output, run};

fn main() {
    // Before anything can print: a completion request answers on stdout and exits.
    completion::answer_if_asked();
    let cli = match Cli::from_arg_matches(&mirrord_cli::args::command().get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    output::set_quiet(cli.quiet);
    logging::init(cli.quiet, output::colour());
    // One worker: every hand-over between tasks on different workers can cost a thread
    // wake-up, which dominates small round trips (DNS lookups, new connections) on machines
    // with idle cores, while one core keeps up with the data (see agent/src/netns.rs).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        // Named so a profile tells mirrord's threads from the command's.
        .thread_name("mirrord-net")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            output::error(format!(
                "cannot start: {error}; check the limits on threads and open files (ulimit -a)"
            ));
            std::process::exit(EXIT_MIRRORD_FAILED);
        }
    };
    // The command runs inside block_on, on this thread, which lives until exit: the launched
    // process and a local agent are tied to it by PR_SET_PDEATHSIG.
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Exec { session, command } => run::exec(session, command).await,
            Command::Shell {
                session,
                shell_args,
            } => run::shell(session, shell_args).await,
            Command::Env { session, format } => run::env(session, *format).await,
            Command::Ls(list) => run::ls(list).await,
            Command::Doctor(doctor) => run::doctor(doctor).await,
            Command::PortForward(forward) => run::port_forward(forward).await,
            Command::VerifyConfig { resolved, path } => run::verify_config(path, *resolved),
            Command::Completions { shell } => run::completions(*shell),
            Command::ManPages { dir } => run::man_pages(dir),
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(failure) => {
            output::error(failure.line());
            failure.code
        }
    };
    // Tasks still blocked on the terminal or sockets must not delay the exit.
    runtime.shutdown_background();
    std::process::exit(code);
}
