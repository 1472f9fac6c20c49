# cpu_proxy.env via build_submission.py extract --dce --minify
from __future__ import annotations
_A9='EXPORT_NAME'
_A8='scale_factor'
_A7='scale_format'
_A6='group_size'
_A5='EVAL_TEMPERATURE_FIT'
_A4='FP_STORAGE_SIM'
_A3='EMBED_DIM'
_A2='TERNARY_SCALE_FORMAT'
_A1='TERNARY_GROUP_SIZE'
_A0='WEIGHT_QUANT'
_z='SOFTCAP_TYPE'
_y='LOGIT_SOFTCAP'
_x='QK_NORM'
_w='ROPE_DIMS'
_v='ROPE_BASE'
_u='TIE_EMBEDDINGS'
_t='MLP_ACT'
_s='MLP_MULT'
_r='NUM_KV_HEADS'
_q='NUM_HEADS'
_p='NUM_LAYERS'
_o='TOKENIZER_PATH'
_n='DATA_PATH'
_m='int8_zlib'
_l='leaky_relu2'
_k='scalars'
_j='encoding'
_i='values'
_h='cpu'
_g='momentum'
_f='weight'
_e='embedding'
_d='all'
_c='fa3'
_b='tanh'
_a='TURBO_QUANT_TRAIN'
_Z='MODEL_DIM'
_Y='VOCAB_SIZE'
_X='trits'
_W='base3'
_V='embed'
_U='name'
_T='fp4'
_S='sdpa'
_R='codes'
_Q='lzma'
_P='brotli'
_O='little'
_N='none'
_M='scales'
_L='matrix'
_K='auto'
_J='scalar'
_I='fp8'
_H='fp16'
_G='cuda'
_F='ternary'
_E=1.
_D=True
_C=.0
_B=False
_A=None
import copy,difflib,glob,json,lzma,math,os,platform,sys,time,uuid,zlib
from pathlib import Path
from typing import NamedTuple
import numpy as np,torch,torch.distributed as dist,torch.nn.functional as F
from torch import Tensor,nn
ENV_PREFIXES='TTT_','EVAL_','CALIB_','MUON_','ADAM_','EXPORT_','TERNARY_','TURBO_QUANT_','EMA_','SLIDING_','TRAIN_','VAL_','WARMDOWN_','WARMUP_','QK_','ROPE_','MLP_','EMBED_','LOGIT_','SOFTCAP_','NUM_','MODEL_','TIED_','FP_','ATTN_','SIZE_','SUBMISSION_'
ENV_SUFFIXES='_LR',
REMOVED_SETTINGS={'EMBED_LR':'0.6','EMA_START_FRAC':'0.5','CALIB_MIN_PARAMS':'65536','EVAL_ENGRAM_ORDER':'2','EVAL_ENGRAM_BUCKETS':'16384','EVAL_ENGRAM_ALPHA':'0.1','EVAL_ENGRAM_WEIGHT':'0.5','EVAL_ENGRAM_CENTER':'3.0','TTT_SCOPE':_k,'TTT_LR':'0.002','TTT_MOMENTUM':'0.9','TTT_EPOCHS':'1','CALIB_TOKENS':'32768','TTT_GRAD_CLIP':'1.0'}
def folded_branches(args):A=args;return(A.turbo_quant_train or A.turbo_quant_export,_B,'args.turbo_quant_train or args.turbo_quant_export'),(A.weight_quant==_F,_D,"args.weight_quant == 'ternary'"),(A.turbo_quant_train,_B,'args.turbo_quant_train'),(A.mlp_act==_l,_B,"args.mlp_act == 'leaky_relu2'"),(A.embed_dim,_B,'args.embed_dim'),(A.tie_embeddings,_D,'args.tie_embeddings'),(A.eval_temperature_fit,_B,'args.eval_temperature_fit'),(A.fp_storage_sim!=_N,_B,"args.fp_storage_sim != 'none'"),(A.max_wallclock_seconds>0,_D,'args.max_wallclock_seconds > 0'),(A.lr_warmup_steps,_D,'args.lr_warmup_steps'),(A.warmdown_iters<=0,_B,'args.warmdown_iters <= 0'),(A.muon_momentum_warmup_steps,_D,'args.muon_momentum_warmup_steps'),(A.warmup_steps,_D,'args.warmup_steps'),(A.val_loss_every,_B,'args.val_loss_every'),(A.grad_clip_norm>0,_B,'args.grad_clip_norm > 0'),(A.ema_decay>0,_B,'args.ema_decay > 0'),(A.export_format==_m,_B,"args.export_format == 'int8_zlib'"),(A.export_codec!=_K,_B,"args.export_codec != 'auto'"),(A.export_format==_F,_D,"args.export_format == 'ternary'"),(A.turbo_quant_export,_B,'args.turbo_quant_export'),(A.submission_mode,_B,'args.submission_mode'),(A.ttt_enabled,_B,'args.ttt_enabled'),(A.eval_engram,_B,'args.eval_engram'),(A.sliding_eval_stride,_B,'args.sliding_eval_stride'),(A.eval_engram or A.ttt_enabled,_B,'args.eval_engram or args.ttt_enabled'),(A.vocab_size,_B,'args.vocab_size'),(A.val_max_tokens,_B,'args.val_max_tokens'),(A.calib_max_evals and A.weight_quant==_F,_B,"args.calib_max_evals and args.weight_quant == 'ternary'")
class ConfigError(ValueError):0
class Setting(NamedTuple):default:object;lo:float|_A=_A;hi:float|_A=_A;choices:tuple[str,...]|_A=_A
def _parse_setting(name,raw,setting):
	I='yes';H='true';D=name;C=raw;A=setting;E=type(A.default);F=C.strip()
	try:
		if E is bool:
			if F.lower()not in('0','1',H,'false',I,'no','on','off'):raise ValueError
			B=F.lower()in('1',H,I,'on')
		elif E is int:
			G=float(F)
			if not G.is_integer():raise ValueError
			B=int(G)
		elif E is float:
			B=float(F)
			if not math.isfinite(B):raise ValueError
		else:B=C
	except ValueError:raise ConfigError(f"{D}={C!r} is not a valid {E.__name__}")from _A
	if A.choices is not _A and B not in A.choices:raise ConfigError(f"{D}={C!r} must be one of {', '.join(A.choices)}")
	if A.lo is not _A and B<A.lo:raise ConfigError(f"{D}={C!r} must be >= {A.lo}")
	if A.hi is not _A and B>A.hi:raise ConfigError(f"{D}={C!r} must be <= {A.hi}")
	return B
class Hyperparameters:
	SETTINGS:dict[str,Setting]={_n:Setting('bench/out/proxy_data'),_o:Setting('bench/out/proxy_data/tokenizer.model'),_Y:Setting(0,lo=0,hi=65536),'RUN_ID':Setting(''),'SEED':Setting(1337,lo=0),'LOG_DIR':Setting('logs'),'ARTIFACT_DIR':Setting(''),'DRY_RUN':Setting(_B),'DIST_TIMEOUT_SECONDS':Setting(1800,lo=1),'ITERATIONS':Setting(20000,lo=1),'WARMUP_STEPS':Setting(2,lo=0),'LR_WARMUP_STEPS':Setting(10,lo=0),'WARMDOWN_ITERS':Setting(200,lo=0),'TRAIN_BATCH_TOKENS':Setting(8192,lo=1),'TRAIN_MICRO_BATCH_TOKENS':Setting(65536,lo=1),'TRAIN_SEQ_LEN':Setting(256,lo=2),'MAX_WALLCLOCK_SECONDS':Setting(6e2,lo=_C),'VAL_LOSS_EVERY':Setting(0,lo=0),'VAL_BATCH_SIZE':Setting(65536,lo=1),'VAL_MAX_TOKENS':Setting(0,lo=0),'TRAIN_LOG_EVERY':Setting(20,lo=1),'GRAD_CLIP_NORM':Setting(_C,lo=_C),'MODEL_COMPILE':Setting('0',choices=(_K,'0','1')),_p:Setting(4,lo=1),_Z:Setting(256,lo=8),_q:Setting(4,lo=1),_r:Setting(2,lo=1),_s:Setting(3.,lo=.25),_t:Setting('relu2',choices=('relu2',_l)),_u:Setting(_D),'TIED_EMBED_INIT_STD':Setting(.005,lo=_C),_v:Setting(1e4,lo=_E),_w:Setting(0,lo=0),_x:Setting(_D),'QK_GAIN_INIT':Setting(1.5,lo=_C),_y:Setting(3e1,lo=_C),_z:Setting(_b,choices=(_b,'poly')),'Z_LOSS_WEIGHT':Setting(_C,lo=_C),_A0:Setting(_F,choices=(_F,_N)),_A1:Setting(128,lo=1),_A2:Setting(_H,choices=(_H,_I)),'ATTN_BACKEND':Setting(_K,choices=(_K,_c,'fa2',_S)),'HEAD_LR':Setting(.008,lo=_C),'TIED_EMBED_LR':Setting(.05,lo=_C),'MATRIX_LR':Setting(.04,lo=_C),'SCALAR_LR':Setting(.04,lo=_C),'MUON_MOMENTUM':Setting(.95,lo=_C,hi=.9999),'MUON_BACKEND_STEPS':Setting(5,lo=1,hi=20),'MUON_MOMENTUM_WARMUP_START':Setting(.85,lo=_C,hi=.9999),'MUON_MOMENTUM_WARMUP_STEPS':Setting(500,lo=0),'MUON_WEIGHT_DECAY':Setting(_C,lo=_C),'MUON_ROW_NORM':Setting(_B),'EMBED_WEIGHT_DECAY':Setting(_C,lo=_C),'BETA1':Setting(.9,lo=_C,hi=.9999),'BETA2':Setting(.95,lo=_C,hi=.99999),'ADAM_EPS':Setting(1e-08,lo=_C),'EXPORT_FORMAT':Setting(_F,choices=(_F,_m)),'EXPORT_FP_FORMAT':Setting(_I,choices=(_I,_T,_H)),'EXPORT_FP16_PATTERNS':Setting('tok_emb,lm_head'),'EXPORT_CLIP_SEARCH':Setting(_D),'EXPORT_CODEC':Setting(_K,choices=(_K,_P,_Q)),'SIZE_CAP_BYTES':Setting(16000000,lo=1),'SIZE_MARGIN_BYTES':Setting(20000,lo=0),'SUBMISSION_MODE':Setting(_B),'CALIB_MAX_SECONDS':Setting(3e1,lo=_C),'EVAL_ARTIFACT':Setting(''),'EVAL_SEQ_LEN':Setting(0,lo=0),'EVAL_CHUNK_TOKENS':Setting(32768,lo=1),'EVAL_MAX_SECONDS':Setting(6e2,lo=_C),'EVAL_DUMP_TOKEN_LOSSES':Setting(''),'EMA_DECAY':Setting(_C,lo=_C,hi=.999999),_A3:Setting(0,lo=0),_A4:Setting(_N,choices=(_N,_I,_T)),_a:Setting(_B),'TURBO_QUANT_EXPORT':Setting(_B),'CALIB_MAX_EVALS':Setting(0,lo=0),_A5:Setting(_B),'SLIDING_EVAL_STRIDE':Setting(0,lo=0),'EVAL_ENGRAM':Setting(_B),'TTT_ENABLED':Setting(_B)}
	def __init__(A,environ=_A):
		C=environ;D=os.environ if C is _A else C;A._reject_unknown(D)
		for(B,E)in A.SETTINGS.items():F=D.get(B);object.__setattr__(A,B.lower(),E.default if F is _A else _parse_setting(B,F,E))
		A._check_relations()
	def __setattr__(A,name,value):raise AttributeError(f"Hyperparameters are read-only after construction (tried to set {name}): values derived at start-up live in Resolved; a changed configuration is Hyperparameters.replace(...)")
	def replace(B,values):A=object.__new__(Hyperparameters);A.__dict__.update(B.__dict__);A.__dict__.update({A.lower():C for(A,C)in values.items()if A in B.SETTINGS});A._check_relations();return A
	@classmethod
	def _reject_unknown(C,env):
		B=env
		for A in sorted(B):
			if A in REMOVED_SETTINGS:
				if B[A]!=REMOVED_SETTINGS[A]:raise ConfigError(f"{A}={B[A]!r}: this file was extracted with {A}={REMOVED_SETTINGS[A]!r} and without the code that reads it; unset it, or extract again from train_gpt.py with the changed config (build_submission.py extract)")
				continue
			E=A.startswith(ENV_PREFIXES)or A.endswith(ENV_SUFFIXES)
			if E and A not in C.SETTINGS:D=difflib.get_close_matches(A,C.SETTINGS,n=1);F=f"; did you mean {D[0]}?"if D else'; unset it or fix the name';raise ConfigError(f"unknown setting {A} (its prefix or suffix is reserved for skc-golf){F}")
	def _check_relations(A):
		def B(ok,message):
			if not ok:raise ConfigError(message)
		B(A.model_dim%A.num_heads==0,f"MODEL_DIM={A.model_dim} must divide by NUM_HEADS={A.num_heads}");B(A.num_heads%A.num_kv_heads==0,f"NUM_HEADS={A.num_heads} must divide by NUM_KV_HEADS={A.num_kv_heads}");B(A.head_dim%2==0,f"head dim MODEL_DIM/NUM_HEADS={A.head_dim} must be even for RoPE");B(A.rope_dims%2==0 and A.rope_dims<=A.head_dim,f"ROPE_DIMS={A.rope_dims} must be even and at most the head dim {A.head_dim}");B(A.embed_dim<A.model_dim,f"EMBED_DIM={A.embed_dim} must be below MODEL_DIM={A.model_dim} (0: an unfactored embedding)");B(A.tie_embeddings or not A.embed_dim,'EMBED_DIM factoring needs TIE_EMBEDDINGS=1');B(float(A.mlp_hidden)==A.mlp_mult*A.model_dim,f"MLP_MULT*MODEL_DIM={A.mlp_mult*A.model_dim} must be a whole number");B(A.sliding_eval_stride<=A.eval_len,f"SLIDING_EVAL_STRIDE={A.sliding_eval_stride} must be at most the eval sequence length {A.eval_len}")
		for(F,C)in((_Z,A.model_dim),('MLP_MULT*MODEL_DIM',A.mlp_hidden)):B(C%A.ternary_group_size==0,f"{F}={C} must divide by TERNARY_GROUP_SIZE={A.ternary_group_size} (ternary scales are per group of input features)")
		for(D,E,G)in folded_branches(A):B(bool(D)==E,f"this file was extracted with `{G}` {E}; the settings make it {bool(D)}: keep the extracted value, or extract again from train_gpt.py with the changed config")
	@property
	def head_dim(self):return self.model_dim//self.num_heads
	@property
	def eval_len(self):return self.eval_seq_len or self.train_seq_len
	@property
	def mlp_hidden(self):return int(self.mlp_mult*self.model_dim)
	def lines(A):return[f"config {B}={getattr(A,B.lower())}"for B in A.SETTINGS]
class Resolved(NamedTuple):run_id:str;vocab_size:int
SHARD_MAGIC=20240520
SHARD_VERSION=1
SHARD_HEADER_INTS=256
SHARD_HEADER_BYTES=SHARD_HEADER_INTS*4
BOS_ID=1
class ShardError(ValueError):0
def read_shard_header(path):
	A=path;A=Path(A)
	try:C=A.stat().st_size
	except FileNotFoundError:raise ShardError(f"shard {A} does not exist")from _A
	if C<SHARD_HEADER_BYTES:raise ShardError(f"shard {A} is {C} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header; the file is truncated: rebuild it with `python data/prepare.py`")
	B=np.fromfile(A,dtype='<i4',count=SHARD_HEADER_INTS)
	if int(B[0])!=SHARD_MAGIC:raise ShardError(f"shard {A} has magic {int(B[0])}, expected {SHARD_MAGIC}: not a competition shard")
	if int(B[1])!=SHARD_VERSION:raise ShardError(f"shard {A} has version {int(B[1])}, expected {SHARD_VERSION}")
	D=int(B[2]);E=SHARD_HEADER_BYTES+2*D
	if D<0 or C!=E:raise ShardError(f"shard {A} header says {D} tokens ({E} bytes) but the file is {C} bytes; the file is truncated or corrupt: rebuild or re-download it")
	return D
def read_shard(path):A=read_shard_header(path);return np.fromfile(path,dtype='<u2',count=A,offset=SHARD_HEADER_BYTES)
def shard_files(pattern):
	A=pattern;B=sorted(glob.glob(A))
	if not B:raise ShardError(f"no shards match {A!r}: download them with `python data/prepare.py download` or build them from local text with `python data/prepare.py build`")
	return B
class TokenStream:
	def __init__(A,files,vocab_size):A.files=files;A.vocab_size=vocab_size;A.file_index=-1;A.tokens=np.zeros(0,dtype=np.uint16);A.pos=0
	def _next_file(A):
		A.file_index=(A.file_index+1)%len(A.files);B=A.files[A.file_index];A.tokens=read_shard(B)
		if A.tokens.size and int(A.tokens.max())>=A.vocab_size:raise ShardError(f"shard {B} holds token id {int(A.tokens.max())} >= VOCAB_SIZE={A.vocab_size}: the shards and the tokenizer do not match")
		A.pos=0
	def take(A,n):
		D,B=[],n
		while B>0:
			if A.pos>=A.tokens.size:A._next_file();continue
			C=min(B,A.tokens.size-A.pos);D.append(A.tokens[A.pos:A.pos+C]);A.pos+=C;B-=C
		return np.concatenate(D)
class DistributedTokenLoader:
	def __init__(A,pattern,vocab_size,rank,world_size,device):A.stream=TokenStream(shard_files(pattern),vocab_size);A.rank,A.world_size,A.device=rank,world_size,device
	def next_batch(A,local_tokens,seq_len):
		D=seq_len;C=local_tokens;F=A.stream.take(A.world_size*C+1);E=A.rank*C;B=torch.from_numpy(F[E:E+C+1].astype(np.int64))
		if A.device.type==_G:B=B.pin_memory().to(A.device,non_blocking=_D)
		return B[:-1].view(-1,D),B[1:].view(-1,D)
class ByteTables(NamedTuple):
	base_bytes:Tensor;has_leading_space:Tensor;is_boundary:Tensor
	def target_bytes(A,prev_ids,target_ids):B=target_ids;C=A.has_leading_space[B]&~A.is_boundary[prev_ids];return A.base_bytes[B].to(torch.int32)+C.to(torch.int32)
def build_byte_tables(sp,vocab_size,device):
	D=device;B=sp;E=max(int(B.vocab_size()),vocab_size);F=np.zeros(E,dtype=np.int16);G=np.zeros(E,dtype=np.bool_);H=np.ones(E,dtype=np.bool_)
	for A in range(int(B.vocab_size())):
		if B.is_control(A)or B.is_unknown(A)or B.is_unused(A):continue
		H[A]=_B
		if B.is_byte(A):F[A]=1;continue
		C=B.id_to_piece(A)
		if C.startswith('▁'):G[A]=_D;C=C[1:]
		F[A]=len(C.encode('utf-8'))
	return ByteTables(torch.from_numpy(F).to(D),torch.from_numpy(G).to(D),torch.from_numpy(H).to(D))
def load_tokenizer(path):
	A=path;import sentencepiece as B
	if not Path(A).is_file():raise FileNotFoundError(f"tokenizer {A} not found: set TOKENIZER_PATH, or get one with `python data/prepare.py download` / `python data/prepare.py build`")
	return B.SentencePieceProcessor(model_file=A)
def check_tokenizer_spec(args,vocab_size):
	E='vocab_size';B=vocab_size;C=Path(__file__).with_name('tokenizer_specs.json')
	if not C.is_file():return
	for A in json.loads(C.read_text())['tokenizers']:
		for(F,D,G)in((_o,Path(args.tokenizer_path).name,A['tokenizer_filename']),(_n,Path(args.data_path).name,f"fineweb10B_{A['dataset_suffix']}")):
			if D==G and A[E]!=B:raise ConfigError(f"{F}={D} is the {A[_U]} variant ({A[E]} tokens) but the tokenizer has {B}: point DATA_PATH and TOKENIZER_PATH at the same variant")
def load_validation_tokens(pattern,seq_len,vocab_size,max_tokens=0):
	E=max_tokens;D=vocab_size;C=seq_len;B=pattern;A=np.concatenate([read_shard(A)for A in shard_files(B)])
	if E:A=A[:E+1]
	F=(A.size-1)//C*C
	if F<=0:raise ShardError(f"validation split {B} has {A.size} tokens, fewer than one sequence of {C}")
	if int(A.max())>=D:raise ShardError(f"validation split {B} holds token id {int(A.max())} >= VOCAB_SIZE={D}")
	return A[:F+1]
FP8_MAX=448.
FP4_GRID=_C,.5,_E,1.5,2.,3.,4.,6.
def fp8_encode(x,scale):return(x/scale).clamp(-FP8_MAX,FP8_MAX).to(torch.float8_e4m3fn)
def fp8_decode(codes,scale):return codes.to(torch.float32)*scale
def fp4_encode(x,scale):A=torch.tensor(FP4_GRID,device=x.device);B=(x/scale).abs().clamp_max(FP4_GRID[-1]);C=(B.unsqueeze(-1)-A).abs().argmin(-1);return(C|(x<0).to(torch.int64)<<3).to(torch.uint8)
def fp4_decode(codes,scale):A=codes;B=torch.tensor(FP4_GRID,device=A.device);C=_E-2.*(A>>3&1).to(torch.float32);return C*B[(A&7).long()]*scale
def fp_row_scale(w,fmt,clip=_E):A=FP8_MAX if fmt==_I else FP4_GRID[-1];B=w.abs().amax(dim=-1,keepdim=_D).float()*clip;return(B/A).clamp_min(1e-12).to(torch.float16).float()
def fp8_scale_factor(scales):return torch.exp2(torch.ceil(torch.log2(scales.amax().clamp_min(1e-30)/FP8_MAX)))
def round_scale(scale,fmt):
	A=scale
	if fmt==_H:return A.clamp(6.2e-05,65504.).to(torch.float16).float()
	B=fp8_scale_factor(A);return fp8_decode(fp8_encode(A,B),B).clamp_min(2.**-9*B)
def ternary_quantize(w,group_size,scale_format,threshold=.5,scale_mult=_E,fixed_scales=_A):
	C=fixed_scales;D=w.detach().float().reshape(w.shape[0],-1,group_size)
	if C is _A:A=D.abs().mean(-1).clamp_min(1e-08);E=round_scale(A*scale_mult,scale_format)
	else:A=E=C
	B=D/A.unsqueeze(-1);F=torch.where(B.abs()>threshold,B.sign(),torch.zeros_like(B));return F.to(torch.int8).reshape(w.shape),E
def ternary_dequantize(trits,scales,group_size):A=trits;B=A.float().reshape(A.shape[0],-1,group_size);return(B*scales.unsqueeze(-1)).reshape(A.shape)
class Role(NamedTuple):quantizable:bool;ttt_scope:str;count_kind:str
ROLES={_V:Role(quantizable=_D,ttt_scope=_d,count_kind=_e),'head':Role(quantizable=_D,ttt_scope=_d,count_kind=_e),_L:Role(quantizable=_D,ttt_scope=_d,count_kind=_L),_J:Role(quantizable=_B,ttt_scope=_k,count_kind=_J)}
def parameter_roles(model):
	C={};D=set()
	for(E,B)in model.named_modules():
		F=getattr(B,'param_roles',{})
		for(A,G)in B.named_parameters(recurse=_B):
			if id(G)in D:continue
			D.add(id(G));H=f"{E}.{A}"if E else A
			if F.get(A)not in ROLES:raise TypeError(f"parameter {H} has no role: declare it in {type(B).__name__}.param_roles as one of {', '.join(ROLES)}")
			C[H]=F[A]
	return C
def with_roles(module,**B):A=module;A.param_roles=B;return A
class TernaryLinear(nn.Linear):
	param_roles={_f:_L}
	def __init__(A,in_features,out_features,group_size,scale_format):super().__init__(in_features,out_features,bias=_B);A.group_size,A.scale_format=group_size,scale_format;A.register_buffer('threshold',torch.tensor(.5),persistent=_B);A.register_buffer('scale_mult',torch.tensor(_E),persistent=_B);A.register_buffer('fixed_scales',_A,persistent=_B)
	def quantized(A,weight=_A):B=weight;return ternary_quantize(A.weight if B is _A else B,A.group_size,A.scale_format,A.threshold,A.scale_mult,A.fixed_scales)
	def forward(A,x):B,C=A.quantized();D=ternary_dequantize(B,C,A.group_size);E=A.weight+(D.to(A.weight.dtype)-A.weight).detach();return F.linear(x,E.to(x.dtype))
class CastedLinear(nn.Linear):
	def __init__(A,in_features,out_features,role=_L):super().__init__(in_features,out_features,bias=_B);A.param_roles={_f:role}
	def forward(A,x):return F.linear(x,A.weight.to(x.dtype))
def make_linear(args,in_features,out_features):B=out_features;A=in_features;C=TernaryLinear;return C(A,B,args.ternary_group_size,args.ternary_scale_format);return CastedLinear(A,B)
def rms_norm(x):return F.rms_norm(x,(x.size(-1),))
class Rotary(nn.Module):
	def __init__(A,rope_dims,base):B=rope_dims;super().__init__();A.rope_dims=B;A.register_buffer('inv_freq',_E/base**(torch.arange(0,B,2).float()/B),persistent=_B);A._cache=_A
	def cos_sin(A,seq_len,device):
		C=seq_len;B=device
		if A._cache is _A or A._cache[0]!=C or A._cache[1]!=B:D=torch.outer(torch.arange(C,device=B,dtype=torch.float32),A.inv_freq.to(B));A._cache=C,B,D.cos()[_A,:,_A,:],D.sin()[_A,:,_A,:]
		return A._cache[2],A._cache[3]
	def forward(A,x):B,C=A.cos_sin(x.size(1),x.device);D,H=x[...,:A.rope_dims],x[...,A.rope_dims:];E=A.rope_dims//2;F,G=D[...,:E],D[...,E:];B,C=B.to(x.dtype),C.to(x.dtype);return torch.cat((F*B+G*C,G*B-F*C,H),dim=-1)
def select_attention_backend(requested,device):
	C=device;B=requested;E=(_c,'fa2',_S)if B==_K else(B,)
	for A in E:
		if A==_S:return A,_A
		if C.type!=_G:continue
		try:
			if A==_c:from flash_attn_interface import flash_attn_func as D
			else:from flash_attn import flash_attn_func as D
			return A,D
		except ImportError:continue
	raise RuntimeError(f"ATTN_BACKEND={B} is not available on {C.type}; use ATTN_BACKEND=auto or sdpa")
class CausalSelfAttention(nn.Module):
	param_roles={'q_gain':_J}
	def __init__(B,args):A=args;super().__init__();B.num_heads,B.num_kv_heads,B.head_dim=A.num_heads,A.num_kv_heads,A.head_dim;C=B.num_kv_heads*B.head_dim;B.c_q=make_linear(A,A.model_dim,A.model_dim);B.c_k=make_linear(A,A.model_dim,C);B.c_v=make_linear(A,A.model_dim,C);B.proj=make_linear(A,A.model_dim,A.model_dim);B.qk_norm=A.qk_norm;B.q_gain=nn.Parameter(torch.full((B.num_heads,),A.qk_gain_init));B.rotary=Rotary(A.rope_dims or B.head_dim,A.rope_base);B.backend,B.flash_fn=_S,_A
	def forward(A,x):
		E,G,I=x.shape;B=A.c_q(x).view(E,G,A.num_heads,A.head_dim);C=A.c_k(x).view(E,G,A.num_kv_heads,A.head_dim);H=A.c_v(x).view(E,G,A.num_kv_heads,A.head_dim)
		if A.qk_norm:B,C=rms_norm(B),rms_norm(C)
		B=A.rotary(B)*A.q_gain.to(B.dtype)[_A,_A,:,_A];C=A.rotary(C)
		if A.flash_fn is not _A:D=A.flash_fn(B,C,H,causal=_D);D=D[0]if isinstance(D,tuple)else D
		else:D=F.scaled_dot_product_attention(B.transpose(1,2),C.transpose(1,2),H.transpose(1,2),is_causal=_D,enable_gqa=A.num_kv_heads!=A.num_heads).transpose(1,2)
		return A.proj(D.reshape(E,G,-1))
class MLP(nn.Module):
	def __init__(B,args):A=args;super().__init__();B.fc=make_linear(A,A.model_dim,A.mlp_hidden);B.proj=make_linear(A,A.mlp_hidden,A.model_dim);B.negative_slope=_C
	def forward(A,x):B=A.fc(x);B=F.leaky_relu(B,A.negative_slope)if A.negative_slope else F.relu(B);return A.proj(B.square())
class Block(nn.Module):
	param_roles={'attn_scale':_J,'mlp_scale':_J,'resid_mix':_J}
	def __init__(B,args):A=args;super().__init__();B.attn=CausalSelfAttention(A);B.mlp=MLP(A);B.attn_scale=nn.Parameter(torch.ones(A.model_dim));B.mlp_scale=nn.Parameter(torch.ones(A.model_dim));B.resid_mix=nn.Parameter(torch.stack((torch.ones(A.model_dim),torch.zeros(A.model_dim))))
	def forward(A,x,x0):B=A.resid_mix.to(x.dtype);x=B[0]*x+B[1]*x0;x=x+A.attn_scale.to(x.dtype)*A.attn(rms_norm(x));return x+A.mlp_scale.to(x.dtype)*A.mlp(rms_norm(x))
def softcap(logits,cap,kind):
	C=logits;A=cap
	if A<=0:return C
	if kind==_b:return A*torch.tanh(C/A)
	B=(C/A).clamp(-1.5,1.5);return A*(B-4./27.*B*B*B)
class GPT(nn.Module):
	param_roles={'skip_weights':_J}
	def __init__(A,args,vocab_size):B=args;super().__init__();A.args=B;C=B.embed_dim or B.model_dim;A.tok_emb=with_roles(nn.Embedding(vocab_size,C),weight=_V);A.embed_proj=_A;A.head_proj=_A;A.lm_head=_A;A.num_encoder_layers=B.num_layers//2;A.num_decoder_layers=B.num_layers-A.num_encoder_layers;A.skip_weights=nn.Parameter(torch.ones(min(A.num_encoder_layers,A.num_decoder_layers),B.model_dim));A.blocks=nn.ModuleList(Block(B)for A in range(B.num_layers));A.register_buffer('logit_temperature',_A);A._init_weights()
	def _init_weights(A):
		C=A.args.tied_embed_init_std;nn.init.normal_(A.tok_emb.weight,std=C)
		for B in A.blocks:nn.init.zeros_(B.attn.proj.weight);nn.init.zeros_(B.mlp.proj.weight)
		if A.lm_head is not _A:nn.init.zeros_(A.lm_head.weight)
	def set_attention_backend(B,name,flash_fn):
		for A in B.blocks:A.attn.backend,A.attn.flash_fn=name,flash_fn
	def embedding_weight(A):B=A.tok_emb.weight;return B
	def hidden_states(B,input_ids):
		A=F.embedding(input_ids,B.embedding_weight())
		if B.embed_proj is not _A:A=B.embed_proj(A)
		A=E=rms_norm(A);C=[]
		for(D,G)in enumerate(B.blocks):
			if D>=B.num_encoder_layers and C:A=A+B.skip_weights[D-B.num_encoder_layers].to(A.dtype)*C.pop()
			A=G(A,E)
			if D<B.num_encoder_layers:C.append(A)
		return rms_norm(A)
	def logits(A,hidden):
		B=hidden
		if A.lm_head is not _A:C=A.lm_head(B)
		else:
			if A.head_proj is not _A:B=A.head_proj(B)
			C=F.linear(B,A.embedding_weight().to(B.dtype))
		D=softcap(C.float(),A.args.logit_softcap,A.args.softcap_type);return D if A.logit_temperature is _A else D/A.logit_temperature
	def forward(A,input_ids):return A.logits(A.hidden_states(input_ids))
def token_losses(logits,target_ids):B=target_ids;A=logits;return F.cross_entropy(A.reshape(-1,A.size(-1)),B.reshape(-1),reduction=_N).view_as(B)
def training_loss(logits,target_ids,z_loss_weight):
	C=z_loss_weight;B=logits;A=token_losses(B,target_ids).mean()
	if C<=0:return A,A
	return A+C*torch.logsumexp(B,dim=-1).square().mean(),A
def zeropower_via_newtonschulz5(G,steps,row_norm=_B):
	E,F,H=3.4445,-4.775,2.0315;A=G.bfloat16()if G.is_cuda else G.float()
	if row_norm:A=A/A.norm(dim=1,keepdim=_D).clamp_min(1e-07)
	C=A.norm()
	if C<1e-12:return torch.zeros_like(G)
	A=A/(C+1e-07);D=G.size(0)>G.size(1)
	if D:A=A.T
	for I in range(steps):B=A@A.T;A=E*A+(F*B+H*B@B)@A
	return(A.T if D else A).to(G.dtype)
class Muon(torch.optim.Optimizer):
	def __init__(A,params,lr,momentum,backend_steps,weight_decay=_C,row_norm=_B,nesterov=_D):super().__init__(params,dict(lr=lr,momentum=momentum,backend_steps=backend_steps,weight_decay=weight_decay,row_norm=row_norm,nesterov=nesterov))
	@torch.no_grad()
	def step(self):
		J='weight_decay';H=dist.is_available()and dist.is_initialized();K,L=(dist.get_world_size(),dist.get_rank())if H else(1,0)
		for B in self.param_groups:
			C=B['params']
			if not C:continue
			F=torch.zeros(sum(A.numel()for A in C),device=C[0].device,dtype=torch.float32);I=torch.tensor([A.grad is not _A for A in C],device=C[0].device,dtype=torch.float32);D=0
			for(M,A)in enumerate(C):
				if M%K==L and A.grad is not _A:N=self.state[A];G=N.setdefault('momentum_buffer',torch.zeros_like(A.grad));G.mul_(B[_g]).add_(A.grad);E=A.grad.add(G,alpha=B[_g])if B['nesterov']else G;E=zeropower_via_newtonschulz5(E,B['backend_steps'],B['row_norm']);E=E*max(_E,E.size(0)/E.size(1))**.5;F[D:D+A.numel()]=E.reshape(-1).float()
				D+=A.numel()
			if H:dist.all_reduce(F);dist.all_reduce(I,op=dist.ReduceOp.MAX)
			D=0
			for(A,O)in zip(C,I.tolist()):
				if O:
					if B[J]:A.mul_(_E-B['lr']*B[J])
					A.add_(F[D:D+A.numel()].view_as(A).to(A.dtype),alpha=-B['lr'])
				D+=A.numel()
def build_optimizers(model,args,fused):
	E=model;A=args;B={A:[]for A in ROLES};C=dict(E.named_parameters())
	for(F,L)in parameter_roles(E).items():
		if C[F].requires_grad:B[L].append(F)
	G=[];M=A.tied_embed_lr
	for(D,H,N)in((_V,M,A.embed_weight_decay),('head',A.head_lr,A.embed_weight_decay),(_J,A.scalar_lr,_C)):
		if B[D]:G.append(dict(params=[C[A]for A in B[D]],lr=H,base_lr=H,weight_decay=N,kind=D))
	I=[torch.optim.AdamW(G,betas=(A.beta1,A.beta2),eps=A.adam_eps,fused=fused)]
	if B[_L]:
		J=Muon([C[A]for A in B[_L]],lr=A.matrix_lr,momentum=A.muon_momentum,backend_steps=A.muon_backend_steps,weight_decay=A.muon_weight_decay,row_norm=A.muon_row_norm)
		for K in J.param_groups:K['base_lr'],K['kind']=A.matrix_lr,_L
		I.append(J)
	return I,B
class Runtime(NamedTuple):
	rank:int;world_size:int;local_rank:int;device:torch.device;distributed:bool
	@property
	def is_main(self):return self.rank==0
	def autocast(A):
		if A.device.type==_G:return torch.autocast(device_type=_G,dtype=torch.bfloat16)
		return torch.autocast(device_type=_h,enabled=_B)
	def all_reduce(A,t,op=_A):
		if A.distributed:dist.all_reduce(t,op=op or dist.ReduceOp.SUM)
		return t
	def barrier(A):
		if A.distributed:dist.barrier()
def init_runtime(args):
	E='WORLD_SIZE';D='RANK';B=D in os.environ and E in os.environ;F=int(os.environ.get(D,0));G=int(os.environ.get(E,1));C=int(os.environ.get('LOCAL_RANK',0))
	if torch.cuda.is_available():A=torch.device(_G,C);torch.cuda.set_device(A)
	else:A=torch.device(_h)
	if B:from datetime import timedelta as H;dist.init_process_group(backend='nccl'if A.type==_G else'gloo',device_id=A if A.type==_G else _A,timeout=H(seconds=args.dist_timeout_seconds))
	return Runtime(F,G,C,A,B)
class Logger:
	def __init__(B,path):
		A=path;B.path=A
		if A is not _A:A.parent.mkdir(parents=_D,exist_ok=_D);A.write_text('')
	def __call__(A,line):
		if A.path is _A:return
		print(line,flush=_D)
		with open(A.path,'a')as B:B.write(line+'\n')
def grad_accum_steps(args,world_size):
	D=world_size;A=args;B,E=divmod(A.train_batch_tokens,D*A.train_seq_len)
	if E or B==0:raise ConfigError(f"TRAIN_BATCH_TOKENS={A.train_batch_tokens} must be a positive multiple of WORLD_SIZE*TRAIN_SEQ_LEN={D*A.train_seq_len}")
	C=max(1,math.ceil(B*A.train_seq_len/A.train_micro_batch_tokens))
	while B%C:C+=1
	return C,B//C*A.train_seq_len
def post_training_fits(args):A=args;return bool(A.calib_max_evals and A.weight_quant==_F)or A.eval_temperature_fit
def training_seconds(args):A=args;B=A.calib_max_seconds if post_training_fits(A)else _C;return max(A.max_wallclock_seconds-B,_C)
def lr_scale(step,elapsed_ms,args):
	D=elapsed_ms;B=step;A=args;E=min(_E,(B+1)/A.lr_warmup_steps);C=min(_E,max(A.iterations-B,0)/A.warmdown_iters)
	if B>0:F=max(1e3*training_seconds(A)-D,_C);C=min(C,F/(A.warmdown_iters*D/B))
	return E*min(C,_E)
def train_step(model,loader,args,rt,accum,micro_tokens):
	B=model;A=accum;C=torch.zeros((),device=rt.device)
	for D in range(A):
		E,F=loader.next_batch(micro_tokens,args.train_seq_len);G=not rt.distributed or D==A-1;H=B.no_sync()if not G else torch.enable_grad()
		with H,rt.autocast():I,J=training_loss(B(E),F,args.z_loss_weight);(I/A).backward()
		C+=J.detach()
	return C/A
def apply_schedules(optimizers,args,step,scale):
	A=args;C=min(step/A.muon_momentum_warmup_steps,_E);E=(_E-C)*A.muon_momentum_warmup_start+C*A.muon_momentum
	for D in optimizers:
		for B in D.param_groups:
			B['lr']=B['base_lr']*scale
			if isinstance(D,Muon):B[_g]=E
def peak_memory_mib(rt):
	if rt.device.type==_G:return torch.cuda.max_memory_allocated(rt.device)/2**20
	import resource as A;return A.getrusage(A.RUSAGE_SELF).ru_maxrss/1024
def use_compile(args,rt):return args.model_compile=='1'or args.model_compile==_K and rt.device.type==_G
def train(args,rt,log,model,val_ctx):
	R=val_ctx;F=log;D=model;B=args;A=rt;J=torch.compile(D,dynamic=_B)if use_compile(B,A)else D
	if A.distributed:from torch.nn.parallel import DistributedDataParallel as b;J=b(J,device_ids=[A.local_rank]if A.device.type==_G else _A,broadcast_buffers=_B)
	H,c=build_optimizers(D,B,fused=A.device.type==_G);d={A:B.numel()for(A,B)in D.named_parameters()}
	for(e,S)in c.items():F(f"param_group:{e} tensors:{len(S)} params:{sum(d[A]for A in S)}")
	N,O=grad_accum_steps(B,A.world_size);F(f"grad_accum_steps:{N} micro_batch_tokens_per_rank:{O}");T=os.path.join(B.data_path,'fineweb_train_*.bin')
	def U():
		for A in H:A.zero_grad(set_to_none=_D)
	f=copy.deepcopy(D.state_dict());g=[copy.deepcopy(A.state_dict())for A in H];h=DistributedTokenLoader(T,D.tok_emb.num_embeddings,A.rank,A.world_size,A.device)
	for k in range(B.warmup_steps):
		train_step(J,h,B,A,N,O)
		for I in H:I.step()
		U()
	D.load_state_dict(f)
	for(I,i)in zip(H,g):I.load_state_dict(i)
	F(f"warmup_steps:{B.warmup_steps} done (weights and optimizer state restored)");j=DistributedTokenLoader(T,D.tok_emb.num_embeddings,A.rank,A.world_size,A.device);l=_A;K=1e3*training_seconds(B)
	if K<=0:raise ConfigError(f"CALIB_MAX_SECONDS={B.calib_max_seconds} leaves no training time in MAX_WALLCLOCK_SECONDS={B.max_wallclock_seconds}")
	V=B.train_batch_tokens;E,C,P,W=_C,0,float('nan'),B.iterations
	if A.device.type==_G:torch.cuda.synchronize()
	L=time.perf_counter()
	while _D:
		X=C==W
		if X:
			if A.device.type==_G:torch.cuda.synchronize()
			E+=1e3*(time.perf_counter()-L);Y=reduce_scored(evaluate_windows(D,R,R.seq_len,A),A);F(f"step:{C}/{B.iterations} val_loss:{Y.val_loss:.4f} val_bpb:{Y.val_bpb:.4f} train_time:{E:.0f}ms step_avg:{E/max(C,1):.2f}ms");L=time.perf_counter()
		if X:break
		G=E+1e3*(time.perf_counter()-L);Q=lr_scale(C,G,B);apply_schedules(H,B,C,Q);Z=train_step(J,j,B,A,N,O)
		for I in H:I.step()
		U();C+=1;G=E+1e3*(time.perf_counter()-L);M=torch.stack((torch.tensor(float(K>0 and G>=K),device=A.device),(~torch.isfinite(Z)).float()));M=A.all_reduce(M,op=dist.ReduceOp.MAX).tolist()
		if M[1]:raise FloatingPointError(f"non-finite training loss at step {C}; last finite train_loss:{P:.4f} lr_scale:{Q:.3f}; lower the learning rates or enable GRAD_CLIP_NORM")
		P=float(Z)
		if C%B.train_log_every==0 or C==1:F(f"step:{C}/{B.iterations} train_loss:{P:.4f} lr_scale:{Q:.3f} tok_s:{C*V/(G/1e3):.0f} train_time:{G:.0f}ms step_avg:{G/C:.2f}ms remaining:{max(K-G,_C)/1e3:.0f}s")
		if M[0]:W=C
	a=C*V/max(E/1e3,1e-09);F(f"train_done steps:{C} train_time:{E:.0f}ms tok_s:{a:.0f}");F(f"peak_mem_mib:{peak_memory_mib(A):.0f}");return{'steps':C,'train_ms':E,'tok_s':a}
ARTIFACT_MAGIC=b'SKCG'
ARTIFACT_VERSION=1
ARTIFACT_CODECS=_P,_Q,'zlib'
MODEL_SETTINGS=_p,_Z,_q,_r,_s,_t,_A3,_u,_v,_w,_x,_y,_z,_A0,_A1,_A2,_A4,_a,_A5
CLIP_RATIOS=_E,.995,.99,.98,.96,.93,.9,.85,.8
class ArtifactError(ValueError):0
def compress(data,codec):
	B=codec;A=data
	if B==_P:import brotli as C;return C.compress(A,quality=11,lgwin=24)
	if B==_Q:return lzma.compress(A,preset=9|lzma.PRESET_EXTREME)
	return zlib.compress(A,9)
def decompress(data,codec):
	B=codec;A=data
	if B==_P:import brotli as C;return C.decompress(A)
	if B==_Q:return lzma.decompress(A)
	return zlib.decompress(A)
def resolve_codec(args):
	try:import brotli;return _P
	except ImportError:return _Q
def pack_trits(trits,packing):A=(trits.reshape(-1).astype(np.int16)+1).astype(np.uint8);B,C=(5,3)if packing==_W else(4,4);A=np.concatenate((A,np.zeros(-A.size%B,dtype=np.uint8))).reshape(-1,B);D=(C**np.arange(B)).astype(np.uint16);return(A.astype(np.uint16)*D).sum(axis=1).astype(np.uint8).tobytes()
def unpack_trits(data,count,packing):
	A=count;B,D=(5,3)if packing==_W else(4,4);C=np.frombuffer(data,dtype=np.uint8).astype(np.int16)
	if C.size!=-(-A//B):raise ArtifactError(f"trit blob holds {C.size} bytes, expected {-(-A//B)} for {A} trits")
	E=C[:,_A]//D**np.arange(B)%D;return(E.reshape(-1)[:A]-1).astype(np.int8)
def pack_nibbles(codes):A=codes.reshape(-1).astype(np.uint8);A=np.concatenate((A,np.zeros(A.size%2,dtype=np.uint8)));return(A[0::2]|A[1::2]<<4).tobytes()
def unpack_nibbles(data,count):A=np.frombuffer(data,dtype=np.uint8);return np.stack((A&15,A>>4),axis=1).reshape(-1)[:count]
def fp_protected(name,args):return any(A and A in name for A in args.export_fp16_patterns.split(','))
def encode_rows(w,fmt,clip):
	B=fmt
	if B=='int8':A=(w.abs().amax(dim=-1,keepdim=_D)*clip/127.).clamp_min(1e-12).to(torch.float16).float();return(w/A).round().clamp(-127,127).to(torch.int8),A
	A=fp_row_scale(w,B,clip);return fp8_encode(w,A)if B==_I else fp4_encode(w,A),A
def decode_rows(codes,scale,fmt):
	B=scale;A=codes
	if fmt=='int8':return A.float()*B
	return fp8_decode(A,B)if fmt==_I else fp4_decode(A,B)
def best_clip(w,fmt,search):
	if not search:return _E
	A=[(float((decode_rows(*encode_rows(w,fmt,A),fmt)-w).square().sum()),A)for A in CLIP_RATIOS];return min(A)[1]
class TensorRecord(NamedTuple):name:str;encoding:str;shape:tuple[int,...];arrays:dict[str,np.ndarray];meta:dict
def encode_tensor(name,t,module,role,args):
	F=role;D=name;C=args;B=module;t=t.detach().float().cpu();G=tuple(t.shape)
	if isinstance(B,TernaryLinear):
		N=B.weight;O,H=B.quantized(N);I={_X:O.cpu().numpy()};J={_A6:B.group_size,_A7:B.scale_format}
		if B.scale_format==_H:I[_M]=H.cpu().to(torch.float16).numpy()
		else:K=fp8_scale_factor(H);I[_M]=fp8_encode(H.cpu(),K.cpu()).view(torch.uint8).numpy();J[_A8]=float(K)
		return TensorRecord(D,_F,G,I,J)
	L=C.fp_storage_sim!=_N and F==_V
	if L:A=C.fp_storage_sim
	elif F is _A or not ROLES[F].quantizable or fp_protected(D,C):A=_H
	else:A=C.export_fp_format
	if A==_H:return TensorRecord(D,_H,G,{_i:t.to(torch.float16).numpy()},{})
	M=_E if L else best_clip(t,A,C.export_clip_search);E,P=encode_rows(t,A,M);E=E.view(torch.uint8)if A==_I else E;return TensorRecord(D,A,G,{_R:E.numpy(),_M:P.to(torch.float16).numpy()},{'clip':M})
def encode_model(model,args):A=model;B={f"{A}.weight"if A else _f:B for(A,B)in A.named_modules()if isinstance(B,TernaryLinear)};C=parameter_roles(A);return[encode_tensor(A,D,B.get(A),C.get(A),args)for(A,D)in A.state_dict().items()]
def decode_tensor(record):
	A=record;B=A.arrays
	if A.encoding==_H:return torch.from_numpy(B[_i].astype(np.float32)).reshape(A.shape),_A
	if A.encoding==_F:
		if A.meta[_A7]==_H:D=torch.from_numpy(B[_M].astype(np.float32))
		else:D=fp8_decode(torch.from_numpy(B[_M].copy()).view(torch.float8_e4m3fn),torch.tensor(A.meta[_A8]))
		E=torch.from_numpy(B[_X].astype(np.int8)).reshape(A.shape);return ternary_dequantize(E,D,A.meta[_A6]),D
	C=torch.from_numpy(B[_R].copy()).reshape(A.shape);C=C.view(torch.float8_e4m3fn)if A.encoding==_I else C;return decode_rows(C,torch.from_numpy(B[_M].astype(np.float32)),A.encoding),_A
def serialize_records(records,config,packing):
	P='fp_scales';O='ternary_scales';N='ternary_trits';H=packing;G='fp_codes';I,J=[],[];K={N:[],O:[],G:[],P:[],_H:[]};L=0
	for A in records:
		M={}
		for(D,C)in A.arrays.items():
			if D==_X:B,E=pack_trits(C,H),N
			elif D==_R and A.encoding==_T:B,E=pack_nibbles(C),G
			else:B=np.ascontiguousarray(C).tobytes();E={_M:O if A.encoding==_F else P,_R:G,_i:_H}[D]
			M[D]=[L,len(B),str(C.dtype),list(C.shape)];I.append(B);L+=len(B);K[E].append(B)
		J.append({_U:A.name,_j:A.encoding,'shape':list(A.shape),'fields':M,'meta':A.meta})
	F=json.dumps({'config':config,'packing':H,'tensors':J},sort_keys=_D,separators=(',',':')).encode();return len(F).to_bytes(4,_O)+F+b''.join(I),{**K,'header':[F]}
def deserialize_records(payload):
	E=payload
	try:
		I=int.from_bytes(E[:4],_O);F=json.loads(E[4:4+I]);J=memoryview(E)[4+I:];K=[]
		for A in F['tensors']:
			C={}
			for(B,(G,L,N,D))in A['fields'].items():
				if G+L>len(J):raise ArtifactError(f"tensor {A[_U]} runs past the end of the payload")
				H=bytes(J[G:G+L]);M=int(np.prod(D))
				if B==_X:C[B]=unpack_trits(H,M,F['packing']).reshape(D)
				elif B==_R and A[_j]==_T:C[B]=unpack_nibbles(H,M).reshape(D)
				else:C[B]=np.frombuffer(H,dtype=np.dtype(N)).reshape(D)
			K.append(TensorRecord(A[_U],A[_j],tuple(A['shape']),C,A['meta']))
		return F['config'],K
	except(ValueError,KeyError,TypeError)as O:raise ArtifactError(f"artifact payload is corrupt: {O}")from _A
def frame_artifact(payload,codec):B=codec;A=compress(payload,B);C=ARTIFACT_MAGIC+bytes((ARTIFACT_VERSION,ARTIFACT_CODECS.index(B)));return C+len(A).to_bytes(4,_O)+zlib.crc32(A).to_bytes(4,_O)+A
def unframe_artifact(blob,source):
	B=source;A=blob
	if len(A)<14 or A[:4]!=ARTIFACT_MAGIC:raise ArtifactError(f"{B} is not an skc-golf artifact (bad magic or shorter than its 14-byte header)")
	if A[4]!=ARTIFACT_VERSION or A[5]>=len(ARTIFACT_CODECS):raise ArtifactError(f"{B} has artifact version {A[4]} / codec {A[5]}, which this trainer cannot read")
	D,E=int.from_bytes(A[6:10],_O),int.from_bytes(A[10:14],_O);C=A[14:]
	if len(C)!=D:raise ArtifactError(f"{B} is truncated: header says {D} payload bytes, file has {len(C)}")
	if zlib.crc32(C)!=E:raise ArtifactError(f"{B} is corrupt: payload checksum mismatch")
	return decompress(C,ARTIFACT_CODECS[A[5]])
def export_name(args):return f"ternary_{resolve_codec(args)}"
def artifact_config(args,vocab_size):A=args;B={B:getattr(A,B.lower())for B in MODEL_SETTINGS};B[_Y]=vocab_size;B[_A9]=export_name(A);B[_a]=A.turbo_quant_train or A.turbo_quant_export and A.export_format==_F;return B
class ExportResult(NamedTuple):blob:bytes;packing:str;codec:str;components:dict[str,list[bytes]];records:list[TensorRecord]
def export_model(model,args,log):
	G=model;C=args;D=encode_model(G,C);H=resolve_codec(C);I=any(A.encoding==_F for A in D);A=[]
	for B in(_W,'2bit')if I else(_W,):J,E=serialize_records(D,artifact_config(C,G.tok_emb.num_embeddings),B);A.append((len((F:=frame_artifact(J,H))),B,F,E))
	if I:log('trit_packing '+' '.join(f"{B}:{A}"for(A,B,C,C)in A)+f" -> {min(A)[1]} (smaller compressed artifact)")
	K,B,F,E=min(A);return ExportResult(F,B,H,E,D)
def model_from_records(config,records,args):
	B=config
	try:G=args.replace({A:B[A]for A in MODEL_SETTINGS if A in B})
	except ConfigError as H:raise ArtifactError(f"the artifact's model settings do not fit this trainer: {H}")from _A
	A=GPT(G,B[_Y]);I={f"{B}.weight":A for(B,A)in A.named_modules()if isinstance(A,TernaryLinear)};C={}
	for D in records:
		J,E=decode_tensor(D);C[D.name]=J
		if E is not _A:I[D.name].fixed_scales=E
	F=set(A.state_dict())-set(C)
	if F:raise ArtifactError(f"the artifact lacks tensors {sorted(F)[:5]}: it was exported by a different model")
	A.load_state_dict(C);A.export_name=B.get(_A9,'artifact');return A
def load_artifact(blob,source,args):A,B=deserialize_records(unframe_artifact(blob,source));return model_from_records(A,B,args)
def component_report(result):
	A=result;C,D=[],[]
	for(E,F)in A.components.items():B=b''.join(F);C.append(f"{E}:{len(B)}");D.append(f"{E}:{len(compress(B,A.codec))if B else 0}")
	return['artifact_components_raw_bytes '+' '.join(C),f"artifact_components_{A.codec}_bytes "+' '.join(D)+' (each compressed alone)']
def largest_tensors(records,count=10):A=sorted(((sum(A.nbytes for A in A.arrays.values()),A.name,A.encoding)for A in records),reverse=_D);return[f"  {B} ({C}): {A} bytes before packing and compression"for(A,B,C)in A[:count]]
def account_artifact(result,code_bytes,args,log):
	E=code_bytes;B=result;A=args;C=E+len(B.blob);D=A.size_cap_bytes-C;log(f"artifact code_bytes:{E} model_bytes:{len(B.blob)} total_bytes:{C} cap_bytes:{A.size_cap_bytes} headroom_bytes:{D} margin_bytes:{A.size_margin_bytes}")
	if D>=A.size_margin_bytes:return
	F=f"artifact total {C} bytes leaves {D} bytes under the {A.size_cap_bytes}-byte cap, less than SIZE_MARGIN_BYTES={A.size_margin_bytes}; the largest tensors:\n"+'\n'.join(largest_tensors(B.records));log('WARNING: '+F)
class EvalTotals(NamedTuple):
	loss_nats:float;targets:int;bytes:int
	@property
	def val_loss(self):return self.loss_nats/self.targets
	@property
	def val_bpb(self):return self.loss_nats/math.log(2.)/self.bytes
class Window(NamedTuple):start:int;first:int;end:int
def plan_windows(lo,hi,num_targets,seq_len,stride):
	B=seq_len;C,A=[],lo
	while A<hi:D=max(0,min(A-1-(B-stride),num_targets-B));E=min(D+B+1,hi);C.append(Window(D,A,E));A=E
	return C
class StreamContext(NamedTuple):
	val:Tensor;last_bos:Tensor;tables:ByteTables;seq_len:int;batch_windows:int
	@property
	def num_targets(self):return self.val.numel()-1
def stream_context(val_tokens,tables,seq_len,batch_tokens,rt):B=seq_len;A=torch.from_numpy(val_tokens.astype(np.int64)).to(rt.device);C=torch.arange(A.numel(),device=rt.device);D=torch.cummax(torch.where(A==BOS_ID,C,torch.full_like(C,-1)),dim=0).values;return StreamContext(A,D,tables,B,max(1,batch_tokens//(rt.world_size*B)))
@torch.no_grad()
def score_windows(model,ctx,windows,rt,engram=_A,observer=_A):
	I=observer;H=engram;G=windows;F=model;A=ctx;C=[]
	for J in range(0,len(G),A.batch_windows):
		D=G[J:J+A.batch_windows];K=torch.stack([A.val[B.start:B.start+A.seq_len]for B in D])
		with rt.autocast():L=F.hidden_states(K)
		M=torch.cat([L[B,A.first-A.start-1:A.end-A.start-1]for(B,A)in enumerate(D)]);E=torch.cat([torch.arange(A.first,A.end,device=rt.device)for A in D])
		with rt.autocast():B=torch.log_softmax(F.logits(M).float(),dim=-1)
		if H is not _A:B=H.mix(B,A.val,A.last_bos,E)
		if I is not _A:I(E,B)
		C.append(-B.gather(-1,A.val[E].unsqueeze(-1)).squeeze(-1))
	return torch.cat(C)if C else torch.zeros(0,device=rt.device)
class ScoredTargets(NamedTuple):targets:Tensor;losses:Tensor;nbytes:Tensor
def scored(ctx,lo,hi,losses):A=ctx;B=torch.arange(lo,hi,device=A.val.device);return ScoredTargets(B,losses,A.tables.target_bytes(A.val[B-1],A.val[B]))
def evaluate_windows(model,ctx,stride,rt,observer=_A):C=model;B=rt;A=ctx;E=plan_windows(1,A.num_targets+1,A.num_targets,A.seq_len,stride);D=E[len(E)*B.rank//B.world_size:len(E)*(B.rank+1)//B.world_size];F=C.training;C.eval();G=score_windows(C,A,D,B,observer=observer);C.train(F);H,I=(D[0].first,D[-1].end)if D else(1,1);return scored(A,H,I,G)
def evaluate_streaming(model,ctx,args,rt,observer=_A,events=_A):
	J=events;I=model;B=rt;A=ctx;L=args.sliding_eval_stride or A.seq_len;K=list(range(1,A.num_targets+1,args.eval_chunk_tokens))+[A.num_targets+1];F=list(zip(K[:-1],K[1:]));E=F[len(F)*B.rank//B.world_size:len(F)*(B.rank+1)//B.world_size];G=_A;I.eval();H=[]
	for(C,D)in E:
		if J is not _A:J.append(('score',C,D))
		H.append(score_windows(I,A,plan_windows(C,D,A.num_targets,A.seq_len,L),B,G,observer))
		if G is not _A:G.absorb(A.val,A.last_bos,torch.arange(C,D,device=B.device))
	C,D=(E[0][0],E[-1][1])if E else(1,1);return scored(A,C,D,torch.cat(H)if H else torch.zeros(0,device=B.device))
def reduce_scored(part,rt):B=part;A=torch.stack((B.losses.double().sum(),torch.tensor(float(B.targets.numel()),device=rt.device,dtype=torch.float64),B.nbytes.double().sum()));A=rt.all_reduce(A);return EvalTotals(float(A[0]),int(A[1]),int(A[2]))
def dump_token_losses(path,part,rt):
	B=part;A=rt;D=B.targets.cpu().numpy(),B.losses.float().cpu().numpy(),B.nbytes.cpu().numpy();E=[_A]*A.world_size if A.distributed else[D]
	if A.distributed:dist.all_gather_object(E,D)
	if A.is_main:F,G,H=(np.concatenate(A)for A in zip(*E));C=np.argsort(F,kind='stable');Path(path).parent.mkdir(parents=_D,exist_ok=_D);np.savez(path,targets=F[C],loss_nats=G[C],bytes=H[C].astype(np.int32))
	A.barrier()
def warm_up_eval(model,ctx,args,rt):
	A=model;B=torch.randint(0,A.tok_emb.num_embeddings,(min(ctx.batch_windows,2),ctx.seq_len),generator=torch.Generator().manual_seed(0)).to(rt.device)
	with torch.no_grad(),rt.autocast():A(B)
def eval_modes(args):A=[];return A
def run_eval_mode(model,ctx,options,args,rt,observer=_A,events=_A):
	C=observer;B=options;A=model
	if B['kind']=='windows':return evaluate_windows(A,ctx,B['stride'],rt,C)
	return evaluate_streaming(A,ctx,args,rt,C,events)
def count_parameters(model):
	F='fp_matrix';B=model;G={id(A.weight)for A in B.modules()if isinstance(A,TernaryLinear)};A={_F:0,F:0,_e:0,_J:0};D=dict(B.named_parameters())
	for(E,H)in parameter_roles(B).items():
		C=ROLES[H].count_kind
		if C==_L:C=_F if id(D[E])in G else F
		A[C]+=D[E].numel()
	A['total']=sum(A.values());return A
def environment_lines(rt):
	A=[f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}",f"platform:{platform.platform()} cpu_count:{os.cpu_count()} world_size:{rt.world_size} device:{rt.device}"]
	if rt.device.type==_G:A.append(f"gpu:{torch.cuda.get_device_name(rt.device)} cuda:{torch.version.cuda}")
	return A
def resolve_run_id(args,rt):
	A=[args.run_id or time.strftime('%Y%m%d_%H%M%S_')+uuid.uuid4().hex[:6]]
	if rt.distributed:dist.broadcast_object_list(A,src=0)
	return A[0]
def export_and_reload(model,args,resolved,rt,log):
	C=log;B=args;D=Path(B.artifact_dir or B.log_dir)/f"{resolved.run_id}_model.skc"
	if rt.is_main:
		E=time.perf_counter();A=export_model(model,B,C);D.parent.mkdir(parents=_D,exist_ok=_D);D.write_bytes(A.blob);C(f"artifact_path:{D} packing:{A.packing} codec:{A.codec} export_time:{1e3*(time.perf_counter()-E):.0f}ms")
		for F in component_report(A):C(F)
		account_artifact(A,Path(__file__).stat().st_size,B,C)
	rt.barrier();return D
def log_eval(log,key,score,rt,args,overhead_ms=_C):
	D=log;C=args;B=key;H=time.perf_counter();F=score();A=reduce_scored(F,rt);E=rt.all_reduce(torch.tensor(overhead_ms+1e3*(time.perf_counter()-H),device=rt.device,dtype=torch.float64),op=dist.ReduceOp.MAX).item();D(f"{B} val_loss:{A.val_loss:.4f} val_bpb:{A.val_bpb:.4f} eval_time:{E:.0f}ms");D(f"{B}_exact val_loss:{A.val_loss:.8f} val_bpb:{A.val_bpb:.8f}")
	if C.eval_dump_token_losses:G=Path(C.eval_dump_token_losses);dump_token_losses(str(G.with_name(f"{G.stem}_{B}.npz")),F,rt)
	if E>1e3*C.eval_max_seconds:I=f"{B} took {E/1e3:.1f}s, over EVAL_MAX_SECONDS={C.eval_max_seconds}";D('WARNING: EVAL OVER BUDGET: '+I)
	return A
def main(environ=_A):
	A=Hyperparameters(environ)
	if A.dry_run:print('\n'.join(A.lines()));print('dry_run: configuration is valid');return
	B=init_runtime(A);M=resolve_run_id(A,B);C=Logger(Path(A.log_dir)/f"{M}.txt"if B.is_main else _A)
	for S in A.lines()+environment_lines(B):C(S)
	torch.manual_seed(A.seed);np.random.seed(A.seed)
	if B.device.type==_h and not B.distributed:C(f"cpu_threads:{torch.get_num_threads()}")
	N=load_tokenizer(A.tokenizer_path);D=int(N.vocab_size());check_tokenizer_spec(A,D);T=Resolved(M,D);O=build_byte_tables(N,D,B.device);I=load_validation_tokens(os.path.join(A.data_path,'fineweb_val_*.bin'),A.train_seq_len,D,A.val_max_tokens);C(f"val_tokens:{I.size-1}");J,P=select_attention_backend(A.attn_backend,B.device);C(f"attn_backend:{J}");Q=stream_context(I,O,A.train_seq_len,A.val_batch_size,B);G=Q if A.eval_len==A.train_seq_len else stream_context(I,O,A.eval_len,A.val_batch_size,B)
	if A.eval_artifact:H=Path(A.eval_artifact);C(f"eval_artifact:{H} (no training)")
	else:
		E=GPT(A,D).to(B.device);E.set_attention_backend(J,P);C('params '+' '.join(f"{A}:{B}"for(A,B)in count_parameters(E).items()));U=train(A,B,C,E,Q);K=time.perf_counter()
		if post_training_fits(A):R=1e3*(time.perf_counter()-K);C(f"post_training_time:{R:.0f}ms total_training_time:{U['train_ms']+R:.0f}ms of MAX_WALLCLOCK_SECONDS={A.max_wallclock_seconds}")
		log_eval(C,'final_prequant',lambda:evaluate_windows(E,G,A.eval_len,B),B,A);H=export_and_reload(E,A,T,B,C)
	K=time.perf_counter();F=load_artifact(H.read_bytes(),str(H),A).to(B.device);F.set_attention_backend(J,P);warm_up_eval(F,G,A,B);L=1e3*(time.perf_counter()-K);C(f"artifact_load_and_warmup_time:{L:.0f}ms");log_eval(C,f"final_{F.export_name}_roundtrip",lambda:evaluate_windows(F,G,A.eval_len,B),B,A,L)
	for(V,W)in eval_modes(A):log_eval(C,V,lambda:run_eval_mode(F,G,W,A,B),B,A,L)
	if B.distributed:dist.destroy_process_group()
if __name__=='__main__':
	try:main()
	except(ConfigError,ShardError,ArtifactError,FileNotFoundError)as error:print(f"error: {error}",file=sys.stderr);sys.exit(2)