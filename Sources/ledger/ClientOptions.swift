import ArgumentParser
import Foundation
import LedgerClient

/// Where the service is, the token and the retry policy: what every client command shares (`credit`, ...,
/// `reverse` and `events`).
struct ConnectionOptions: ParsableArguments {
    @Option(name: .customLong("url"), help: "The service's base URL (env: LEDGER_URL; default: http://127.0.0.1:8080).")
    var url: String?

    @Option(name: .customLong("token"), help: "The bearer token (env: LEDGER_TOKEN).")
    var token: String?

    @Option(name: .customLong("retry-base-ms"), help: "The first backoff bound, doubled at each retry.")
    var retryBaseMs: Int = 100

    @Option(name: .customLong("retry-max-ms"), help: "The largest backoff bound; a longer Retry-After is still honoured.")
    var retryMaxMs: Int = 10_000

    @Option(name: .customLong("retries-max"), help: "Retries after the first attempt.")
    var retriesMax: Int = 8

    @Option(name: .customLong("timeout-s"), help: "The time all attempts and waits may take together, in seconds.")
    var timeoutS: Int = 60

    @Option(
        name: .customLong("attempt-timeout-s"),
        help: "One attempt's bound, in seconds: no answer by then counts as a timeout and is retried.")
    var attemptTimeoutS: Int = 20

    func validate() throws {
        guard retryBaseMs >= 0, retryMaxMs >= 0 else { throw ValidationError("--retry-base-ms and --retry-max-ms must be >= 0") }
        guard retriesMax >= 0 else { throw ValidationError("--retries-max must be >= 0") }
        guard timeoutS >= 1, attemptTimeoutS >= 1 else {
            throw ValidationError("--timeout-s and --attempt-timeout-s must be >= 1")
        }
    }

    func baseURL() throws -> URL {
        let text = url ?? Environment.string("LEDGER_URL") ?? "http://127.0.0.1:8080"
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), ["http", "https"].contains(scheme),
            url.host != nil
        else { throw ValidationError("--url \(text) is not an http or https URL") }
        return url
    }

    var policy: RetryPolicy {
        RetryPolicy(
            retryBaseMs: retryBaseMs, retryMaxMs: retryMaxMs, retriesMax: retriesMax, timeoutS: timeoutS,
            attemptTimeoutS: attemptTimeoutS)
    }

    /// A client that reports each retry on standard error.
    func client() throws -> LedgerClient {
        LedgerClient(url: try baseURL(), token: token ?? Environment.string("LEDGER_TOKEN"), policy: policy) {
            ClientOptions.standardError(
                "ledger: attempt \($0.attempt): \(ClientOptions.describe($0.failure)); retrying in \($0.waitMs) ms")
        }
    }
}

/// What every keyed client command (`credit`, `debit`, `transfer`, `hold`, `capture`, `void`, `reverse`) shares:
/// the connection and the operation's key. The exit code tells a script what happened: 0 a 2xx, 1 any other
/// definitive answer (retrying the same request would get the same), 2 no definitive answer (retry later with the
/// same key: it replays or executes once).
struct ClientOptions: ParsableArguments {
    @OptionGroup var connection: ConnectionOptions

    @Option(
        name: .customLong("idempotency-key"),
        help: "The operation's key; pass the same one to retry by hand (default: a new random UUID, printed to standard error first).")
    var idempotencyKey: String?

    func validate() throws {
        if let idempotencyKey, idempotencyKey.isEmpty { throw ValidationError("--idempotency-key must not be empty") }
    }

    /// Sends one call under the operation's key, retrying as the policy says; prints the final answer's body on
    /// standard output and exits 0, 1 or 2 (see the type's comment).
    func send<Output: Sendable>(_ call: (Client, String) async throws -> Output) async throws {
        let key = idempotencyKey ?? LedgerClient.newIdempotencyKey()
        // First, so that a person can retry by hand whatever happens next.
        Self.standardError("idempotency-key: \(key)")
        let client = try connection.client()
        let answer: LedgerAnswer
        do {
            answer = try await client.answer { try await call($0, key) }.answer
        } catch {
            Self.standardError("ledger: \(error); the request may or may not have executed: retry with --idempotency-key \(key)")
            throw ExitCode(2)
        }
        var body = Data(answer.body)
        if body.last != UInt8(ascii: "\n") { body.append(UInt8(ascii: "\n")) }
        FileHandle.standardOutput.write(body)
        guard answer.isSuccess else {
            Self.standardError("ledger: \(answer.status) \(answer.problem?.code ?? "")")
            throw ExitCode(1)
        }
    }

    static func describe(_ failure: RetryEvent.Failure) -> String {
        switch failure {
        case .answer(let answer): return "\(answer.status) \(answer.problem?.code ?? "")"
        case .noAnswer(let reason): return "no answer (\(reason))"
        }
    }

    static func standardError(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}

/// `--metadata JSON`: the transfer's metadata, a JSON object.
struct MetadataOption: ParsableArguments {
    @Option(name: .customLong("metadata"), help: "The metadata, a JSON object (default: none, which the service reads as {}).")
    var json: String?

    func value() throws -> Components.Schemas.Metadata? {
        guard let json else { return nil }
        do {
            return try JSONDecoder().decode(Components.Schemas.Metadata.self, from: Data(json.utf8))
        } catch {
            throw ValidationError("--metadata must be a JSON object")
        }
    }
}

/// `--if-match V`: execute only if the payer's version is V (`7` or `"7"`).
struct IfMatchOption: ParsableArguments {
    @Option(name: .customLong("if-match"), help: "Execute only if the paying account's version is this (7 or \"7\").")
    var version: String?

    /// The header value: a bare number becomes the strong tag the service expects; anything else goes as given,
    /// for the service to judge.
    var header: String? {
        guard let version else { return nil }
        let isNumber = !version.isEmpty && version.allSatisfy { $0.isASCII && $0.isNumber }
        return isNumber ? "\"\(version)\"" : version
    }
}
