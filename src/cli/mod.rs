//! Every flag is declared once here (global ones on `Args`, the rest on their subcommand) and
//! turned into the library's settings structs in one place per command.

mod attack;
mod benches;
mod data;
mod eval;
mod import;
mod purifier;
mod run;
mod train;

use anyhow::Result;
use atop::runtime::{self, DeviceSpec};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "atop",
    version,
    about = "Adversarial purification (AToP) and attack evaluation on libtorch"
)]
pub struct Args {
    /// Where tensors are computed: auto (CUDA when libtorch sees it), cpu, cuda, cuda:N.
    #[arg(long, global = true, default_value = "auto", env = "ATOP_DEVICE")]
    pub device: DeviceSpec,
    /// CPU threads for libtorch, decoding and data workers (default: all cores).
    #[arg(value_parser = crate::cli::positive, long, global = true, env = "ATOP_THREADS")]
    pub threads: Option<usize>,
    /// Images per stacked EOT pass: the EOT draws of a batch of n run max(1, this / n) at a
    /// time in one forward/backward (lower it if a stacked pass runs out of memory). Counted at
    /// the input's size: behind a purifier or transform working at a larger size, each image
    /// counts (work size / image size)^2 times.
    #[arg(long, global = true, env = "ATOP_EOT_BATCH", default_value_t = runtime::DEFAULT_EOT_BATCH)]
    pub eot_batch: usize,
    /// No progress bars or log lines; results only.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Print results as JSON on stdout (implies --quiet).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Versions, libtorch location, CUDA and thread count.
    Info,
    /// Inspect and download datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train models.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Convert a PyTorch checkpoint (.pt/.pth) to atop's format, running no pickled code.
    Import(import::ImportArgs),
    /// Evaluate models.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Purifier architecture details.
    #[command(subcommand)]
    Purifier(purifier::PurifierCommand),
    /// Transform and purify a dataset split or a folder of images; PSNR/SSIM and accuracy.
    Purify(Box<purifier::PurifyArgs>),
    /// Attack a model: FGSM, PGD, APGD-CE/DLR/T, FAB-T, Square, C&W, AutoAttack; robust accuracy per attack.
    Attack(Box<attack::AttackArgs>),
    /// A whole study in one command: train (or take) a classifier and a purifier, fine-tune the
    /// purifier with AToP, attack both defended models alike, write one report; resumable.
    Run(Box<run::RunArgs>),
    /// Benchmarks (timings measured here, printed side by side).
    #[command(subcommand)]
    Bench(benches::BenchCommand),
}

/// Settings every command receives.
pub struct Global {
    pub device: tch::Device,
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let quiet = args.quiet || args.json;
    atop::progress::set_quiet(quiet);
    tracing_subscriber::fmt()
        .with_writer(|| FlagStderr)
        // Colour codes only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(if quiet {
            tracing::Level::WARN
        } else {
            tracing::Level::INFO
        })
        .without_time()
        .init();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(t) = args.threads
        && t > 8 * cores
    {
        anyhow::bail!(
            "--threads {t}: this machine has {cores} cores; more than {} threads only slow it down",
            8 * cores
        );
    }
    runtime::tune_allocator();
    runtime::init_threads(args.threads);
    // Bounded like a batch: a huge value would stack every EOT draw of a batch at once.
    if let Err(e) = batch(&args.eot_batch.to_string()) {
        anyhow::bail!("--eot-batch {}: {e}", args.eot_batch);
    }
    runtime::set_eot_batch(args.eot_batch);
    let global = Global {
        device: args.device.resolve()?,
        json: args.json,
    };
    match args.command {
        Command::Info => info(&global),
        Command::Data(cmd) => data::run(cmd, &global),
        Command::Train(cmd) => train::run(cmd, &global),
        Command::Eval(cmd) => eval::run(cmd, &global),
        Command::Purifier(cmd) => purifier::run(cmd, &global),
        Command::Purify(args) => purifier::purify(*args, &global),
        Command::Attack(args) => attack::run(*args, &global),
        Command::Import(args) => import::run(args, &global),
        Command::Run(args) => run::run(*args, &global),
        Command::Bench(cmd) => benches::run(cmd, &global),
    }
}

fn info(global: &Global) -> Result<()> {
    let info = runtime::engine_info();
    if global.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("atop {}", info.atop_version);
        println!("torch {} ({})", info.torch_version, info.libtorch_lib);
        println!(
            "cuda: {} ({} device(s), cudnn {})",
            if info.cuda_available {
                "available"
            } else {
                "not available"
            },
            info.cuda_devices,
            info.cudnn_available
        );
        println!("device: {:?}", global.device);
        println!("threads: {}", info.threads);
        println!("cpu: {}", info.cpu);
        println!(
            "allocator: {}",
            if info.allocator_tuned {
                "glibc malloc, memory kept for reuse (mmap threshold 32 MiB, trim threshold 1 GiB)"
            } else {
                "defaults (GLIBC_TUNABLES sets malloc options, or not glibc)"
            }
        );
    }
    Ok(())
}

/// Parser of counts that must be at least 1 (sizes, steps, images, rounds, threads): 0 is
/// refused at the command line, naming the flag, before any work.
/// Parser of a share in (0, 1].
pub fn share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("expected a number in (0, 1], got '{s}'")),
    }
}

pub fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("expected at least 1, got 0".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("expected a whole number, got '{s}'")),
    }
}

/// Parser of an image side in pixels: 1 to the largest side atop decodes.
pub fn image_side(s: &str) -> Result<i64, String> {
    let max = atop::data::MAX_IMAGE_SIZE as i64;
    match s.trim().parse::<i64>() {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected an image side of 1 to {max} pixels, got '{s}'"
        )),
    }
}

/// A positive count of at most `max` (`what` names the unit in the error).
fn at_most(s: &str, max: usize, what: &str) -> Result<usize, String> {
    match positive(s)? {
        v if v <= max => Ok(v),
        v => Err(format!("expected at most {max} {what}, got {v}")),
    }
}

/// Parser of a benchmark's alternating rounds: 1 to 100 (a median sharpens little past that,
/// and a typo in the millions would run for days).
pub fn rounds(s: &str) -> Result<usize, String> {
    at_most(s, 100, "rounds")
}

/// Parser of a batch size: 1 to 65,536 images (a larger batch does not fit any machine atop
/// runs on, and a typo would only fail inside an allocation).
pub fn batch(s: &str) -> Result<usize, String> {
    at_most(s, 65_536, "images per batch")
}

/// Library errors name a setting by its config key in backticks (`quantize`, `skip_corrupt`);
/// on the command line each key that is one of atop's flags is written as that flag
/// (`--quantize`, `--skip-corrupt`), and any other stays a config key.
pub fn with_flags(message: &str) -> String {
    use clap::CommandFactory;
    fn collect(c: &clap::Command, flags: &mut std::collections::HashSet<String>) {
        flags.extend(
            c.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string)),
        );
        for s in c.get_subcommands() {
            collect(s, flags);
        }
    }
    static FLAGS: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    let flags = FLAGS.get_or_init(|| {
        let mut flags = std::collections::HashSet::new();
        collect(&Args::command(), &mut flags);
        flags
    });
    let is_key = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let (mut out, mut rest) = (String::new(), message);
    while let Some(i) = rest.find('`') {
        let after = &rest[i + 1..];
        match after.find('`').filter(|&j| is_key(&after[..j])) {
            Some(j) => {
                let flag = after[..j].replace('_', "-");
                out.push_str(&rest[..i]);
                if flags.contains(&flag) {
                    out.push_str("--");
                    out.push_str(&flag);
                } else {
                    out.push_str(&rest[i..i + j + 2]);
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(&rest[..=i]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// An error as the command line prints it: in the CLI's language ([`with_flags`]), except one
/// about a settings file's text, whose names are that file's keys (a TOML error's list of the
/// keys a table takes would otherwise read as flags).
pub fn error_text(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if e.chain().any(|c| c.is::<toml::de::Error>()) {
        text
    } else {
        with_flags(&text)
    }
}

/// Standard error for log lines, which speak the CLI's language too: each write (one event) goes
/// through [`with_flags`].
struct FlagStderr;

impl std::io::Write for FlagStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(with_flags(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_keys_in_errors_become_flags() {
        assert_eq!(
            super::with_flags(
                "a quantisation (`quantize` 8); use `skip_corrupt`; `not_a_flag` stays; `x y` too"
            ),
            "a quantisation (--quantize 8); use --skip-corrupt; `not_a_flag` stays; `x y` too"
        );
    }

    #[test]
    fn a_settings_file_error_keeps_the_files_keys() {
        use anyhow::Context;
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Settings {
            batch_size: usize,
        }
        let e = toml::from_str::<Settings>("batch_sise = 3")
            .context("run.toml: not a valid config")
            .unwrap_err();
        let text = super::error_text(&e);
        assert!(text.contains("expected `batch_size`"), "{text}");
        let flagged = super::error_text(&anyhow::anyhow!("`batch_size` 0 is too small"));
        assert_eq!(flagged, "--batch-size 0 is too small");
    }
}
