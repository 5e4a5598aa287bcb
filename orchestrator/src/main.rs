//! `mm`: the muse–majordomo command line. `mm up` starts the three services locally, `mm run`
//! runs one turn (starting them itself when no orchestrator is given), `mm chat` talks,
//! `mm sessions` lists, `mm serve` is the orchestrator service, `mm eval` runs the dream lab
//! (the `mm-eval` binary beside this one).

mod policy_args;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mm_proto::orchestrator::v1 as pb;
use orchestrator::config::{Config, Flags};
use orchestrator::{auth, local, render};
use policy_args::PolicyArgs;
use std::io::{BufRead, Write};

#[derive(Parser)]
#[command(
    name = "mm",
    version,
    about = "A dreaming muse and a sober majordomo, in conversation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the orchestrator API (orchestrator.v1, health, reflection).
    Serve(Flags),
    /// Start muse, majordomo and orchestrator locally (loopback, default models) until ctrl-c
    /// or SIGTERM.
    Up(UpArgs),
    /// One turn in a new session; prints the reply (`--json`: the turn's events as JSON lines).
    Run(RunArgs),
    /// An interactive session.
    Chat(ChatArgs),
    /// List the sessions.
    Sessions(ClientArgs),
    /// Turn latency breakdown and throughput at 1, 4 and 16 concurrent sessions (JSON).
    Bench(BenchArgs),
    /// The dream lab: creativity against coherence for dream settings and plain sampling
    /// (`mm eval --help`; runs the `mm-eval` binary).
    #[command(disable_help_flag = true)]
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    sessions: Vec<usize>,
    /// Turns each session runs, one after another.
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// Print JSON (the only format; for symmetry with the other benches).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    /// Muse model (alias, hf:..., or path).
    #[arg(long, default_value = "smollm2-135m")]
    pub muse_model: String,
    /// Majordomo model.
    #[arg(long, default_value = "smollm2-135m")]
    pub majordomo_model: String,
    /// Orchestrator address (the services get free ports).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub listen: String,
    /// The orchestrator's HTTP API (OpenAI-compatible `/v1`, `/metrics`).
    #[arg(long, default_value = "127.0.0.1:50080")]
    pub http: String,
    /// The session store: a redb file, or a postgres:// URL.
    #[arg(long, default_value = "mm-data/sessions.redb")]
    pub store: String,
    /// CPU threads per model service.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl UpArgs {
    /// What to start: these settings with the orchestrator on `listen` and `http`.
    fn launch(&self, listen: &str, http: &str) -> local::Launch {
        local::Launch {
            muse_model: self.muse_model.clone(),
            majordomo_model: self.majordomo_model.clone(),
            listen: listen.to_string(),
            http: http.to_string(),
            store: self.store.clone(),
            threads: self.threads,
            env: Vec::new(),
        }
    }
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// A running orchestrator (default: start the services locally for this command).
    #[arg(long, env = "MM_ORCHESTRATOR")]
    orchestrator: Option<String>,
    #[command(flatten)]
    up: UpArgs,
}

#[derive(Args)]
struct RunArgs {
    /// What to ask the muse.
    prompt: String,
    /// Print every event of the turn as a JSON line instead of the reply.
    #[arg(long)]
    json: bool,
    /// Latent steps reported: quiet, sampled or full.
    #[arg(long, default_value = "sampled", value_parser = ["quiet", "sampled", "full"])]
    verbosity: String,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct ChatArgs {
    /// Continue this session instead of starting one.
    #[arg(long)]
    session: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    client: ClientArgs,
}

fn verbosity(s: &str) -> pb::Verbosity {
    match s {
        "quiet" => pb::Verbosity::Quiet,
        "full" => pb::Verbosity::Full,
        _ => pb::Verbosity::Sampled,
    }
}

/// Connects to `--orchestrator`, or starts the services locally (kept alive by the guard).
async fn connect(c: &ClientArgs) -> Result<(auth::Client, Option<local::Services>)> {
    let (addr, guard) = match &c.orchestrator {
        Some(a) => (a.clone(), None),
        None => {
            let services =
                local::Services::start(&c.up.launch("127.0.0.1:0", "127.0.0.1:0")).await?;
            (services.orchestrator.clone(), Some(services))
        }
    };
    let client = auth::connect(&addr).await?;
    Ok((client, guard))
}

async fn run_turn(
    client: &mut auth::Client,
    session: &str,
    message: &str,
    v: pb::Verbosity,
    mut on: impl FnMut(&pb::turn_event::Event),
) -> Result<Option<String>> {
    let req = pb::TurnRequest {
        session_id: session.into(),
        message: message.into(),
        verbosity: v as i32,
        ..Default::default()
    };
    let mut stream = client
        .turn(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut reply = None;
    while let Some(ev) = stream.message().await? {
        let Some(e) = ev.event else { continue };
        on(&e);
        match e {
            pb::turn_event::Event::Reply(r) => reply = Some(r.text),
            pb::turn_event::Event::Error(err) => anyhow::bail!(
                "turn failed ({}): {}",
                tonic::Code::from(err.code),
                err.message
            ),
            _ => {}
        }
    }
    Ok(reply)
}

async fn cmd_run(a: RunArgs) -> Result<()> {
    anyhow::ensure!(
        !a.prompt.trim().is_empty(),
        "the prompt is empty: mm run \"<what to ask>\""
    );
    let (mut client, _services) = connect(&a.client).await?;
    let session = client
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(a.policy.to_pb()),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let json = a.json;
    let reply = run_turn(
        &mut client,
        &session.id,
        &a.prompt,
        verbosity(&a.verbosity),
        |e| {
            if json {
                println!("{}", render::event_json(e));
            } else {
                eprint!("{}", render::compact(e));
            }
        },
    )
    .await?;
    if !json {
        println!("{}", reply.unwrap_or_default());
    }
    Ok(())
}

async fn cmd_chat(a: ChatArgs) -> Result<()> {
    let (mut client, _services) = connect(&a.client).await?;
    let id = match a.session {
        Some(id) => {
            client
                .get_session(pb::GetSessionRequest {
                    session_id: id.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .id
        }
        None => {
            client
                .create_session(pb::CreateSessionRequest {
                    roles: None,
                    policy: Some(a.policy.to_pb()),
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .id
        }
    };
    eprintln!("session {id} — type a message, empty line or ctrl-d to leave");
    let stdin = std::io::stdin();
    loop {
        eprint!("you> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        match run_turn(&mut client, &id, line.trim(), pb::Verbosity::Full, |e| {
            eprint!("{}", render::compact(e))
        })
        .await
        {
            Ok(reply) => println!("muse> {}", reply.unwrap_or_default()),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}

async fn cmd_sessions(a: ClientArgs) -> Result<()> {
    let (mut client, _services) = connect(&a).await?;
    let list = client
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    for s in list.sessions {
        let roles = s.roles.unwrap_or_default();
        println!(
            "{}  {} turns  muse={} majordomo={}",
            s.id, s.turn_count, roles.muse, roles.majordomo
        );
    }
    Ok(())
}

async fn cmd_bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.sessions.iter().all(|&n| n >= 1),
        "--sessions takes counts >= 1"
    );
    anyhow::ensure!(a.turns >= 1, "--turns must be at least 1");
    let (mut client, _services) = connect(&a.client).await?;
    let report = orchestrator::bench::run(&mut client, &a.sessions, a.turns).await?;
    let _ = a.json;
    println!("{report}");
    Ok(())
}

async fn cmd_up(a: UpArgs) -> Result<()> {
    let services = local::Services::start(&a.launch(&a.listen, &a.http)).await?;
    eprintln!(
        "orchestrator at {} (muse {}, majordomo {}); OpenAI-compatible API at {}/v1, metrics at {}/metrics; ctrl-c to stop",
        services.orchestrator, services.muse, services.majordomo, services.http, services.http
    );
    println!("{}", services.orchestrator);
    // Dropping the services stops them: on ctrl-c and on SIGTERM alike.
    mm_kit::serve::shutdown_signal().await;
    drop(services);
    Ok(())
}

async fn cmd_serve(flags: Flags) -> Result<()> {
    let cfg = Config::load(&flags, None).context("mm serve configuration")?;
    orchestrator::service::serve(cfg).await
}

/// `mm eval …`: runs `mm-eval …` from beside this binary, passing its exit status on.
fn cmd_eval(args: Vec<String>) -> Result<()> {
    let exe = std::env::current_exe()?.with_file_name("mm-eval");
    let status = std::process::Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| {
            format!(
                "starting {} (build the workspace: cargo build --release)",
                exe.display()
            )
        })?;
    std::process::exit(status.code().unwrap_or(1));
}

fn main() {
    mm_kit::trace::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match Cli::parse().command {
            Command::Serve(f) => cmd_serve(f).await,
            Command::Up(a) => cmd_up(a).await,
            Command::Run(a) => cmd_run(a).await,
            Command::Chat(a) => cmd_chat(a).await,
            Command::Sessions(a) => cmd_sessions(a).await,
            Command::Bench(a) => cmd_bench(a).await,
            Command::Eval { args } => cmd_eval(args),
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
