/**
 * Medusa's Payment Module flows per second — create collection, create session, authorize,
 * capture — at concurrency 1 and 16, with Medusa's own `pp_system_default` and with
 * `pp_payhost_system` (this bridge -> payhost's system provider over HTTP), in one run.
 *
 *   npm run bench            (BENCH_SECONDS=5 per cell by default; PAYHOST_BIN as for the tests)
 *
 * Everything runs on this machine: PostgreSQL for Medusa, payhost on SQLite, Node for both
 * Medusa and the bridge; the numbers are this machine's, for comparing the two providers.
 */
import { bootMedusa, createDatabase, providerOptions, startPayhost } from "../test/integration/harness"
import type { IPaymentModuleService } from "@medusajs/framework/types"

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const WARMUP = 20

async function flow(payment: IPaymentModuleService, provider: string, i: number): Promise<void> {
  const amount = 10 + (i % 90)
  const collection = await payment.createPaymentCollections({ amount, currency_code: "eur" })
  const session = await payment.createPaymentSession(collection.id, {
    provider_id: provider,
    amount,
    currency_code: "eur",
    data: {},
  })
  const p = await payment.authorizePaymentSession(session.id, {})
  if (!p) throw new Error("not authorized")
  await payment.capturePayment({ payment_id: p.id })
}

type Cell = { provider: string; concurrency: number; flows: number; seconds: number; p50: number; p99: number; errors: number }

async function run(payment: IPaymentModuleService, provider: string, concurrency: number): Promise<Cell> {
  let i = 0
  for (let w = 0; w < WARMUP; w++) await flow(payment, provider, i++)
  const latencies: number[] = []
  let errors = 0
  const until = Date.now() + SECONDS * 1000
  const started = process.hrtime.bigint()
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < until) {
        const t0 = process.hrtime.bigint()
        try {
          await flow(payment, provider, i++)
          latencies.push(Number(process.hrtime.bigint() - t0) / 1e6)
        } catch (e) {
          errors++
          if (errors <= 3) console.error(`${provider} c=${concurrency}: ${(e as Error).message}`)
        }
      }
    })
  )
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  latencies.sort((a, b) => a - b)
  const q = (f: number) => latencies[Math.min(latencies.length - 1, Math.floor(f * latencies.length))] ?? NaN
  return { provider, concurrency, flows: latencies.length, seconds, p50: q(0.5), p99: q(0.99), errors }
}

async function main() {
  const db = await createDatabase()
  const payhost = await startPayhost()
  const medusa = await bootMedusa(db.url, [{ id: "system", options: providerOptions(payhost, "system") }])
  const cells: Cell[] = []
  try {
    for (const concurrency of [1, 16]) {
      for (const provider of ["pp_system_default", "pp_payhost_system"]) {
        cells.push(await run(medusa.payment, provider, concurrency))
      }
    }
  } finally {
    await medusa.shutdown()
    await payhost.stop()
    await db.drop()
  }
  console.log(`\nMedusa Payment Module flows (collection + session + authorize + capture), ${SECONDS} s per cell, ${WARMUP} warm-up flows`)
  console.log("payhost on SQLite, one request per session created\n")
  const rows = [["provider", "concurrency", "flows", "flows/s", "p50 ms", "p99 ms", "errors"]]
  for (const c of cells) {
    rows.push([c.provider, String(c.concurrency), String(c.flows), (c.flows / c.seconds).toFixed(1), c.p50.toFixed(1), c.p99.toFixed(1), String(c.errors)])
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  for (const [n, r] of rows.entries()) {
    console.log(r.map((v, i) => (i === 0 ? v.padEnd(widths[i]) : v.padStart(widths[i]))).join("  "))
    if (n === 0) console.log(widths.map((w) => "-".repeat(w)).join("  "))
  }
  for (const c of [1, 16]) {
    const base = cells.find((x) => x.provider === "pp_system_default" && x.concurrency === c)!
    const ph = cells.find((x) => x.provider === "pp_payhost_system" && x.concurrency === c)!
    console.log(`c=${c}: pp_payhost_system runs at ${((ph.flows / ph.seconds) / (base.flows / base.seconds) * 100).toFixed(0)}% of pp_system_default`)
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
