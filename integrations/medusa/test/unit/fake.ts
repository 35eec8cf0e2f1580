/** A scripted `fetch` for unit tests: records requests, answers from a queue. */
export type Recorded = { method: string; url: URL; headers: Record<string, string>; body: any }
export type Scripted =
  | { status: number; body?: unknown; headers?: Record<string, string> }
  | { throw: unknown }
  | ((r: Recorded) => { status: number; body?: unknown; headers?: Record<string, string> })

export function fakeFetch(script: Scripted[]) {
  const requests: Recorded[] = []
  const f = async (input: any, init: any) => {
    const url = new URL(String(input))
    const r: Recorded = {
      method: init?.method ?? "GET",
      url,
      headers: { ...(init?.headers ?? {}) },
      body: init?.body ? JSON.parse(init.body) : undefined,
    }
    requests.push(r)
    let next = script.shift()
    if (!next) {
      throw new Error(`unexpected request ${r.method} ${url.pathname}`)
    }
    if (typeof next === "function") {
      next = next(r)
    }
    if ("throw" in next) {
      throw next.throw
    }
    return new Response(next.body === undefined ? "" : JSON.stringify(next.body), {
      status: next.status,
      headers: { "content-type": "application/json", ...(next.headers ?? {}) },
    })
  }
  return { fetch: f as unknown as typeof fetch, requests }
}

export function connRefused(): unknown {
  const e = new TypeError("fetch failed") as any
  e.cause = Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:9"), { code: "ECONNREFUSED" })
  return e
}

export function connReset(): unknown {
  const e = new TypeError("fetch failed") as any
  e.cause = Object.assign(new Error("other side closed"), { code: "UND_ERR_SOCKET" })
  return e
}

export function err(type: string, code: string, message: string, param?: string) {
  return { error: { type, code, message, ...(param ? { param } : {}) } }
}
