//! `engine-sim`: a stand-in vLLM engine for tests, benchmarks and the demo. See `tandem_tests::sim`.

use clap::Parser;
use tandem_tests::sim::{self, Config};

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    sim::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(sim::run(cfg))
}
